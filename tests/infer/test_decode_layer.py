"""A decode step's layer in one C call: where it serves (1 to 4 rows of frozen fp32 linears, the few-columns layout,
a roomy cache, no prompt beside the rows) every layer runs through it and the step equals the model's forward;
everywhere else the torch walk runs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import VOCAB, tiny_llama, tiny_qwen2
from lorakit.infer import decode_layer
from lorakit.infer.decode_linears import use_decode_linears
from lorakit.infer.decode_step import decode_and_prefill, decode_logits
from lorakit.infer.int8_weights import use_int8_weights
from lorakit.lora import base
from lorakit.lora.mixed import row_adapters
from test_decode_step import TARGETS, assert_same, decode_both, prefilled

pytestmark = pytest.mark.skipif(decode_layer._library() is None, reason="no C compiler here to build the kernel")


@pytest.fixture
def few_layout(monkeypatch):
    """The few-columns product chosen for 1 to 4 rows, as measure_layouts chooses it on CPUs where it is faster."""
    monkeypatch.setattr(base, "_layouts", {rows: "few" if rows <= 4 else "weight" for rows in range(1, 17)})


@pytest.fixture
def layer_calls(monkeypatch):
    """What each call of decode_layer.run returned."""
    returned, real = [], decode_layer.run
    monkeypatch.setattr(decode_layer, "run", lambda *args: returned.append(real(*args)) or returned[-1])
    return returned


def wide_llama() -> LlamaForCausalLM:
    """Wide enough heads and long enough prompts that the kernel's attention runs on several threads."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


def qwen2_with_biases():
    """tiny_qwen2 with non-zero q, k and v biases (initialised to zero)."""
    model = tiny_qwen2()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("build", [tiny_llama, qwen2_with_biases], ids=["llama", "qwen2-with-biases"])
def test_every_layer_runs_in_one_call_and_the_step_equals_the_forward(build, rows, few_layout, layer_calls):
    model = use_decode_linears(build())
    assert_same(*decode_both(model, steps=4, rows=rows))
    assert layer_calls == [True] * (4 * len(model.model.layers))


def test_long_rows_attend_on_several_threads_and_equal_the_forward(few_layout, layer_calls):
    model = use_decode_linears(wide_llama())
    (cache, mask, position, tokens), (plain, *_) = prefilled(model, 4, width=160), prefilled(model, 4, width=160)
    with torch.no_grad():
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones((4, 1))], dim=1)
            got = decode_logits(model, tokens, mask, position, cache)
            expected = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                             past_key_values=plain).logits[:, -1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            position, tokens = position + 1, expected.argmax(-1)
    assert layer_calls and all(layer_calls)
    for mine, theirs in zip(cache.layers, plain.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_where_it_does_not_serve_the_torch_walk_runs(few_layout, layer_calls, monkeypatch):
    model = use_decode_linears(tiny_llama())
    assert_same(*decode_both(model, rows=5))  # more rows than the few-columns product takes
    assert layer_calls == []
    monkeypatch.setattr(base, "_layouts", {rows: "weight" for rows in range(1, 17)})  # another layout chosen here
    assert_same(*decode_both(model, rows=2))
    assert layer_calls == []


def test_a_lora_layer_in_a_mixed_batch_keeps_the_torch_walk(few_layout, layer_calls):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS[:1]), "a")
    model = use_decode_linears(model)  # the other six projections frozen linears
    with row_adapters(model, ["a", "a"]):
        assert_same(*decode_both(model, rows=2))
    assert layer_calls and not any(layer_calls)


def test_prompts_beside_the_rows_keep_the_torch_walk(few_layout, layer_calls):
    model = use_decode_linears(tiny_llama())
    cache, mask, position, tokens = prefilled(model, 2)
    mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    with torch.no_grad():
        decode_and_prefill(model, tokens, mask, position, cache, [[5, 6, 7]])
    assert layer_calls == []


def test_a_weight_replaced_or_cast_after_a_step_is_read_anew(few_layout, layer_calls):
    model = use_decode_linears(tiny_llama())
    assert_same(*decode_both(model, rows=2))
    down = model.model.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(torch.randn_like(down.weight), requires_grad=False)  # a new tensor
    assert_same(*decode_both(model, rows=2))
    assert all(layer_calls)
    down.weight.data = down.weight.data.bfloat16()  # the same parameter, cast: the layer is no longer the kernel's
    assert decode_layer._plan(model.model.layers[1], model.config) is None
    assert decode_layer._plan(model.model.layers[0], model.config) is not None


def test_a_layer_of_other_shapes_than_the_kernel_takes_is_left_to_torch(few_layout):
    model = use_decode_linears(tiny_llama())
    layer = model.model.layers[0]
    assert decode_layer._plan(layer, model.config) is not None
    up = layer.mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight[:-1].clone(), requires_grad=False)  # no longer gate's width
    assert decode_layer._plan(layer, model.config) is None


w8a8_here = pytest.mark.skipif(decode_layer._library() is None or not decode_layer._library().decode_layer_w8a8(),
                               reason="the layer kernel takes w8a8 weights where the CPU has AVX-512 VNNI")


def w8a8_model(build):
    """build()'s model with every projection int8, its inputs rounded to int8 as the forward rounds them, prepared
    for decoding."""
    model = build()
    use_int8_weights(model, "w8a8")
    return use_decode_linears(model)


@w8a8_here
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("build", [tiny_llama, qwen2_with_biases], ids=["llama", "qwen2-with-biases"])
def test_a_w8a8_model_runs_every_layer_in_one_call_and_the_step_equals_its_forward(build, rows, few_layout,
                                                                                    layer_calls):
    model = w8a8_model(build)
    assert_same(*decode_both(model, steps=4, rows=rows))
    assert layer_calls == [True] * (4 * len(model.model.layers))


@w8a8_here
def test_a_layer_of_int8_and_fp32_projections_is_left_to_torch(few_layout, layer_calls):
    model = w8a8_model(tiny_llama)
    layer = model.model.layers[0]
    assert decode_layer._plan(layer, model.config) is not None
    layer.mlp.down_proj.int8_activations = False  # int8 weights, fp32 inputs: not the kernel's
    assert decode_layer._plan(layer, model.config) is None
    assert_same(*decode_both(model, rows=2))
    assert layer_calls == [False, True] * 3


@w8a8_here
def test_w8a8_scales_changed_in_place_are_read_anew(few_layout, layer_calls):
    model = w8a8_model(tiny_llama)
    layer = model.model.layers[0]
    before = decode_layer._plan(layer, model.config)
    layer.mlp.up_proj.weight_scales.mul_(2)  # the same tensor, new values: the kernel's fp32 copy must follow
    assert decode_layer._plan(layer, model.config) is not before
    assert_same(*decode_both(model, rows=2))
    assert layer_calls and all(layer_calls)
