"""Quantised bases for QLoRA: bitsandbytes Linear4bit / Linear8bitLt under lorakit's LoRA layers.

The rest of lorakit sees a quantised base only through `is_quantized`, `dequantized_weight` and
`weight_bytes` (lorakit.quant.bnb); the LoRA math itself does not change.
"""

from lorakit.quant.bnb import dequantized_weight, is_quantized, weight_bytes
from lorakit.quant.model import dequantize_model, has_quantized_layers, quantize_model, weight_bytes_report

__all__ = [
    "dequantize_model",
    "dequantized_weight",
    "has_quantized_layers",
    "is_quantized",
    "quantize_model",
    "weight_bytes",
    "weight_bytes_report",
]
