"""int8 linear weights for decoding: what is quantised, the rounding bound, outputs close to fp32 with every row's
own adapter, the feature-major step equal to the forward, merging refused, and bad settings refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_llama, tiny_qwen2
from lorakit.infer.decode_linears import use_decode_linears
from lorakit.infer.int8_weights import int8_linear_from, int8_rows, use_int8_weights
from lorakit.lora.base import Int8WeightLinear, dequantize_model, dequantized_weight, is_quantized
from lorakit.lora.mixed import row_adapters

from test_decode_step import assert_same, decode_both, with_adapters
import test_half_weights
from test_half_weights import mixed_logits

toy = test_half_weights.toy  # the fixture: a toy model folder with adapters "a" and "b" saved beside it


def loaded(toy, quantize: str):
    return test_half_weights.loaded(toy, quantize, use_int8_weights)


def test_each_weight_is_within_half_a_step_of_its_int8_value():
    weight = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    weight[5] = 0  # an all-zero row keeps a usable scale
    q, scales = int8_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48,)
    assert q.abs().amax(1)[torch.arange(48) != 5].ge(126).all()  # each row uses the whole int8 range
    step = scales.float()[:, None]
    assert ((q.float() * step - weight).abs() <= 0.5 * step * 1.01).all()
    assert torch.isfinite(step).all() and q[5].eq(0).all()


def test_an_int8_linear_computes_its_dequantised_weight_with_bf16_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    quantised = int8_linear_from(linear)
    x = torch.randn(2, 3, 48)
    expected = x.to(torch.bfloat16).float() @ dequantized_weight(quantised).t() + linear.bias.detach()
    got = quantised(x)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 24)
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.01)  # the kernel answers in bf16
    assert (got - linear(x)).abs().max() < 0.05  # and that is close to the fp32 layer


def test_every_linear_the_tied_head_too_is_int8_and_the_embeddings_stay_fp32():
    model = tiny_llama()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert use_int8_weights(model, "int8") == "int8"
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is Int8WeightLinear for m in linears)
    assert model.get_output_embeddings().weight.dtype == torch.int8
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not model.config.tie_word_embeddings


def test_a_linear_the_kernel_cannot_take_stays_fp32():
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 16))  # 40 inputs: not a multiple of 16
    model.config = tiny_llama().config
    use_int8_weights(model, "int8")
    assert type(model[0]) is Int8WeightLinear and type(model[1]) is nn.Linear


def test_w8a8_rounds_the_inputs_of_every_layer_whose_width_takes_blocks_of_32():
    """w8a8: the same int8 weights; layers of 32k inputs round their inputs to int8 in every fp32 product, the
    forward's rows and a decode step's columns alike (lora/weight_kernel.py: w8a8_product); others keep fp32 inputs."""
    from lorakit.lora.base import frozen_features, int8_linear
    from lorakit.lora.weight_kernel import w8a8_product

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 16))  # 48 inputs: a multiple of 16, not of 32
    model.config = tiny_llama().config
    reference = [nn.Linear(64, 48), nn.Linear(48, 16)]
    for plain, linear in zip(reference, model):
        plain.load_state_dict(linear.state_dict())
    assert use_int8_weights(model, "w8a8") == "w8a8"
    first, second = model
    assert type(first) is type(second) is Int8WeightLinear
    assert first.int8_activations and not second.int8_activations
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        rows = first(x)
        want = w8a8_product(x.reshape(-1, 64).t().contiguous(), first.weight, first.weight_scales.float())
        assert torch.equal(rows.reshape(-1, 48), (want + first.bias[:, None]).t())
        assert torch.equal(frozen_features(first, x.reshape(-1, 64).t()), rows.reshape(-1, 48).t())
        assert (rows - reference[0](x)).abs().max() < 0.05
        assert torch.equal(second(rows), int8_linear(rows, second.weight, second.weight_scales, second.bias))
    with torch.enable_grad():  # autograd: the weight-only product, as int8
        torch.testing.assert_close(first(x), int8_linear_from(reference[0])(x))


def test_off_changes_nothing_and_unknown_settings_or_devices_are_refused(toy):
    model, used = loaded(toy, "off")
    assert used is None and not any(type(m) is Int8WeightLinear for m in model.modules())
    with pytest.raises(ValueError, match="expected one of off, int8"):
        use_int8_weights(tiny_llama(), "int4")
    with pytest.raises(ValueError, match="CPU only"):
        use_int8_weights(tiny_llama().to("meta"), "int8")


def test_a_mixed_batch_on_int8_weights_stays_close_to_fp32_with_each_rows_adapter(toy):
    rows = ["a", "b", None, "a"]
    fp32 = mixed_logits(loaded(toy, "off")[0], rows)
    model, used = loaded(toy, "int8")
    assert used == "int8"
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "lora_" in name)
    quantised = mixed_logits(model, rows)
    rounding = (quantised - fp32).abs().max().item()
    base = mixed_logits(loaded(toy, "off")[0], [None] * len(rows))
    adapter_effect = (fp32 - base)[[0, 1, 3]].abs().max().item()
    assert rounding <= 0.05 * fp32.abs().max().item()
    assert rounding < 0.1 * adapter_effect  # every row still gets its own adapter's term


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-with-biases"])
def test_the_lean_step_on_int8_weights_equals_the_forward(build):
    model = build()
    assert use_int8_weights(model, "int8") == "int8"
    assert_same(*decode_both(use_decode_linears(model)), atol=1e-4)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-with-biases"])
def test_the_lean_step_on_w8a8_equals_the_forward(build):
    model = build()
    assert use_int8_weights(model, "w8a8") == "w8a8"
    assert any(m.int8_activations for m in model.modules() if type(m) is Int8WeightLinear)
    # an input one fp32 rounding away (the lean step's norms sum in another order) can round to the neighbouring
    # int8 value, 1/127 of its block's largest apart, and carry that on
    assert_same(*decode_both(use_decode_linears(model)), atol=2e-3)


def test_adapters_on_int8_weights_decode_as_through_the_forward():
    model = tiny_llama()
    use_int8_weights(model, "int8")
    model = with_adapters(use_decode_linears(model))
    with row_adapters(model, ["a", "b", None], "gathered"):
        # The int8 product rounds its input to bf16: an input one fp32 rounding away (the lean step's norms sum
        # in another order) can land on the neighbouring bf16 value, 2^-8 of it apart, and carry that on.
        assert_same(*decode_both(model), atol=1e-3)


def test_merging_into_int8_is_refused_until_dequantised(toy):
    model, _ = loaded(toy, "int8")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert is_quantized(q_proj.base_layer)
    with pytest.raises(TypeError, match="cannot merge into a quantised Int8WeightLinear"):
        q_proj.merge(["a"])
    before = mixed_logits(model, ["a"])
    dequantize_model(model)
    assert not any(type(m) is Int8WeightLinear for m in model.modules())
    after = mixed_logits(model, ["a"])  # the same int8-rounded weights, now multiplied in fp32 (x no longer bf16)
    assert (after - before).abs().max() <= 0.01 * before.abs().max()
    q_proj.merge(["a"])
    assert q_proj.merged == ["a"]
