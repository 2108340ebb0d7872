"""merge_with_report: merging into the dequantised base keeps the outputs; into W moves them, and says how much."""

from __future__ import annotations

import torch

import lorakit
from conftest import TINY_MODELS, logits_of, perturb
from lorakit.config import QuantizationConfig
from lorakit.lora.adapters import lora_layers
from lorakit.quant import is_quantized, quantize_model
from lorakit.quant.merge import merge_with_report


def _adapter_on(model):
    lorakit.inject(model, lorakit.LoraConfig(r=4))
    perturb(model, std=0.1)
    return model


def test_merge_report_on_a_4bit_base(input_ids):
    batches = [{"input_ids": input_ids[i : i + 1]} for i in range(2)]
    model = _adapter_on(quantize_model(TINY_MODELS["llama"](), QuantizationConfig(bits=4)))
    merged, gaps = merge_with_report(
        model, batches, full_precision=lambda: _adapter_on(TINY_MODELS["llama"]())
    )
    dequantised, full = gaps
    assert dequantised.max_abs <= 1e-5 and dequantised.top1_agreement == 1.0
    assert full.max_abs > 1e-2 and "full-precision" in full.line()  # the quantisation error shows up
    # The returned model is the full-precision merge: W + s B A, plain Linear layers.
    assert not lora_layers(merged) and not any(is_quantized(m) for m in merged.modules())
    reference = _adapter_on(TINY_MODELS["llama"]())
    assert torch.allclose(logits_of(merged, input_ids), logits_of(reference, input_ids), atol=1e-5)
