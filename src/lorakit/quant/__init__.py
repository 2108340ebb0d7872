"""Quantised bases for QLoRA: bitsandbytes Linear4bit / Linear8bitLt under lorakit's LoRA layers.

The LoRA code sees a quantised base only through lorakit.lora.base's protocol (is it quantised,
its dequantised weight, its bytes, a plain copy), which the bitsandbytes backend implements and
registers here; the LoRA math itself does not change.
"""

from lorakit.lora.base import dequantize_model, register_quantized_backend
from lorakit.quant.bnb import BitsAndBytesBackend, dequantized_weight, is_quantized, weight_bytes
from lorakit.quant.model import has_quantized_layers, quantize_model, weight_bytes_report

register_quantized_backend(BitsAndBytesBackend())

__all__ = [
    "dequantize_model",
    "dequantized_weight",
    "has_quantized_layers",
    "is_quantized",
    "quantize_model",
    "weight_bytes",
    "weight_bytes_report",
]
