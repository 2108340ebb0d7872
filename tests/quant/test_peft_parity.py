"""An adapter trained on a 4-bit base: saved in PEFT's format, loaded back, and loaded by PEFT on a bitsandbytes base."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.checkpoint.peft_io import load_adapter, save_adapter
from lorakit.config import QuantizationConfig
from lorakit.models import load_causal_lm
from lorakit.quant import quantize_model
from conftest import TOY_TARGETS, bnb_load, logits_of, perturb, toy_model_folder


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory):
    """A toy model folder, and an adapter 'trained' (perturbed) on its NF4 base, saved in PEFT's format."""
    root = tmp_path_factory.mktemp("qlora")
    folder = toy_model_folder(root / "model")
    model = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=4))
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS))
    perturb(model, std=0.1)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    save_adapter(model, root / "adapter")
    return folder, root / "adapter", ids, logits_of(model, ids)


def test_the_adapter_loads_back_on_a_fresh_4bit_base(qlora_adapter):
    folder, adapter, ids, trained = qlora_adapter
    model = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=4))
    load_adapter(model, adapter)
    assert torch.equal(logits_of(model, ids), trained)


def test_peft_on_a_bitsandbytes_4bit_base_gives_the_same_outputs(qlora_adapter):
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    folder, adapter, ids, trained = qlora_adapter
    model = PeftModel.from_pretrained(bnb_load(folder, bits=4), adapter).eval()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, PeftLinear4bit)
    peft_logits = logits_of(model, ids)
    with model.disable_adapter():
        assert (logits_of(model, ids) - trained).abs().max() > 1e-2  # the adapter matters
    # Same packed weights, same fp32 compute; only the order of the LoRA products differs.
    assert (peft_logits - trained).abs().max() <= 1e-4
