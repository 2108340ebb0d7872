"""load_for_inference: a base quantised for generation loads in the type its checkpoint is stored in."""

from __future__ import annotations

import torch

from lorakit.config import QuantizationConfig
from lorakit.infer import load
from lorakit.infer.load import load_for_inference
from lorakit.models import load_causal_lm
from lorakit.quant import quantize_model
from conftest import toy_model_folder


def test_a_bf16_checkpoint_quantised_for_inference_is_the_fp32_loads_model(tmp_path, monkeypatch):
    folder = toy_model_folder(tmp_path / "model")
    load_causal_lm(folder).to(torch.bfloat16).save_pretrained(folder)
    loaded = []  # the type each load asked for (the real load runs)
    real = load_causal_lm
    monkeypatch.setattr(load, "load_causal_lm",
                        lambda name, dtype, **kw: loaded.append(dtype) or real(name, dtype, **kw))
    model, _, _, _ = load_for_inference(str(folder), bits=4)
    assert loaded == [torch.bfloat16]
    load_for_inference(str(folder))
    assert loaded == [torch.bfloat16, torch.float32]  # not quantised: fp32
    expected = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=4)).state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert model.config.dtype == torch.float32


def test_a_quantised_base_is_rebuilt_as_the_adapter_was_trained_on(tmp_path):
    """The run card's 4-bit type and double quantisation, not the defaults: an fp4 adapter merged into an nf4 base
    was off by 4.6 in its logits, with a gap report near zero."""
    import lorakit
    from lorakit.checkpoint.run_card import write_run_card
    from lorakit.infer.load import quantize_as_asked

    folder = toy_model_folder(tmp_path / "model")
    model = lorakit.inject(load_causal_lm(folder), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    write_run_card(tmp_path / "adapter", quantization={"bits": 4, "type": "fp4", "double_quant": False})
    expected = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=4, type="fp4", double_quant=False))
    base = load_causal_lm(folder)
    assert quantize_as_asked(base, 4, str(tmp_path / "adapter")) is None  # trained on 4 bits: no note
    state = base.state_dict()
    for key, value in expected.state_dict().items():
        assert torch.equal(state[key], value), key
