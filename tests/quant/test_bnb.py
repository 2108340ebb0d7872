"""The bitsandbytes backend: quantised copies of a Linear, their weights read back, their bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.config import QuantizationConfig
from lorakit.quant.bnb import (
    dequantized_weight,
    full_precision_bytes,
    is_quantized,
    quantize_linear,
    weight_bytes,
)


def _linear(in_features=576, out_features=1536, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize(
    "config, most_bytes, error",
    [
        # weights are uniform in +-0.042; the error bound is half the widest gap between levels
        (QuantizationConfig(bits=4, double_quant=True), 0.13, 0.01),  # 0.5 + 1/64 + small, over 4 bytes
        (QuantizationConfig(bits=4, double_quant=False), 0.15, 0.01),  # 0.5 + 4/64 bytes over 4
        (QuantizationConfig(bits=4, type="fp4"), 0.13, 0.01),
        (QuantizationConfig(bits=8), 0.26, 0.0005),  # 1 byte + a 4-byte scale per row
    ],
)
def test_quantised_copy_computes_with_its_dequantised_weight(config, most_bytes, error):
    linear = _linear()
    quantised = quantize_linear(linear, config)
    assert is_quantized(quantised) and not is_quantized(linear)
    assert not any(p.requires_grad for p in quantised.parameters())
    weight = dequantized_weight(quantised)  # (out, in) float32
    assert weight.shape == linear.weight.shape
    assert 0 < (weight - linear.weight).abs().max() < error
    x = torch.randn(3, 576)
    expected = x @ weight.T + linear.bias
    tolerance = 1e-4 if config.bits == 4 else 0.05  # LLM.int8 quantises the input rows too
    assert torch.allclose(quantised(x), expected, atol=tolerance)
    assert weight_bytes(quantised) <= most_bytes * full_precision_bytes(quantised)


def test_eval_forward_equals_training_forward():
    """bitsandbytes would repack the weight on an AVX512-BF16 CPU's first eval forward (bf16 scales)."""
    quantised = quantize_linear(_linear(), QuantizationConfig(bits=4))
    x = torch.randn(5, 576)
    training = quantised.train()(x)
    with torch.no_grad():
        evaluated = quantised.eval()(x)
    assert torch.equal(training, evaluated)
    assert torch.equal(quantised.train()(x), training)


def test_input_gradient_flows_through_a_quantised_base():
    linear = _linear(bias=False)
    quantised = quantize_linear(linear, QuantizationConfig(bits=4))
    x = torch.randn(3, 576, requires_grad=True)
    quantised(x).pow(2).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    (y @ dequantized_weight(quantised).T).pow(2).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-4, rtol=1e-4)
