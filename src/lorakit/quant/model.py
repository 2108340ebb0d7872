"""Quantise a loaded model's linear layers in place (QLoRA), undo it, and count the bytes saved.

Quantising after loading (rather than through transformers' `BitsAndBytesConfig` at load time)
works the same for every way `lorakit.models` finds a model: a folder, a Hub id, or the embedded
GGUF converted once to a cached safetensors folder. The result matches a
`BitsAndBytesConfig(load_in_4bit=True, ...)` load of the same weights byte for byte (see
tests/quant/test_peft_parity.py).

What stays in full precision, as `prepare_model_for_kbit_training` leaves it: embeddings, the
(often tied) output head, norms, biases, classifier heads and modules trained in full.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import QuantizationConfig
from lorakit.lora.inject import CLASSIFIER_HEADS
from lorakit.lora.layer import LoraLayer
from lorakit.quant.bnb import full_precision_bytes, is_quantized, quantize_linear, weight_bytes
from lorakit.quant.loftq import loftq_adapters, loftq_layer

log = logging.getLogger(__name__)


def _kept_in_full_precision(model: nn.Module, name: str, module: nn.Module) -> bool:
    """The output head, classifier heads, and anything inside a per-adapter saved module."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = output.base_layer if isinstance(output, LoraLayer) else output
    parts = name.split(".")
    return module is head or any(p in CLASSIFIER_HEADS or p in ("copies", "original_module") for p in parts)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantizationConfig) -> nn.Module:
    """Replace the model's plain nn.Linear layers (LoRA bases included) by bitsandbytes ones.

    Call it before `inject` for QLoRA, or after `inject` for LoftQ (`init_lora_weights: loftq`
    needs the full-precision weights to initialise A and B from the quantisation error). Layers
    already quantised are left alone, so calling it twice is harmless.

    Returns:
        The same model, with norms and other float parameters in fp32 and input gradients enabled
        (so gradient checkpointing reaches the adapters of the first layer).
    """
    if config.bits is None:
        return model
    loftq = loftq_adapters(model)
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _kept_in_full_precision(model, name, module):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, LoraLayer) and loftq:
            parent.base_layer = loftq_layer(parent, config, loftq)
        else:
            model.set_submodule(name, quantize_linear(module, config))
        count += 1
    _prepare_for_kbit_training(model, config)
    log.info("quantised %d linear layers to %d bits", count, config.bits)
    return model


def _prepare_for_kbit_training(model: nn.Module, config: QuantizationConfig) -> None:
    """What `prepare_model_for_kbit_training` does, but the freezing (inject does that) and checkpointing (the loop)."""
    cast = False
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data, cast = param.data.float(), True
    if cast and getattr(model, "config", None) is not None:  # loaded in a stored half type: fp32 now
        model.config.dtype = torch.float32
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    # transformers' flags for a bitsandbytes-loaded model: PEFT dispatches on them, and
    # transformers then refuses a dtype cast that would break the packed weights.
    model.is_loaded_in_4bit = config.bits == 4
    model.is_loaded_in_8bit = config.bits == 8


def has_quantized_layers(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


@dataclass
class WeightBytes:
    """Bytes of the base's weights: the quantised linear layers, and the whole base model."""

    quantized_layers: int
    linear_bytes: int  # what the quantised layers' weights take now (scales included)
    linear_fp32_bytes: int  # what the same weights take in fp32
    model_bytes: int  # every base parameter (adapters excluded), as stored
    model_fp32_bytes: int  # the same in fp32

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes / max(self.linear_fp32_bytes, 1)

    @property
    def model_ratio(self) -> float:
        return self.model_bytes / max(self.model_fp32_bytes, 1)

    def line(self) -> str:
        return (
            f"base weights: {self.quantized_layers} quantised linear layers {self.linear_bytes / 2**20:.1f} MiB "
            f"= {self.linear_ratio:.3f}x their fp32 size; whole base {self.model_bytes / 2**20:.1f} MiB "
            f"= {self.model_ratio:.3f}x fp32"
        )

    def as_dict(self) -> dict:
        return {
            **self.__dict__,
            "linear_ratio": round(self.linear_ratio, 4),
            "model_ratio": round(self.model_ratio, 4),
        }


def weight_bytes_report(model: nn.Module) -> WeightBytes:
    """Count the base's bytes as stored and as fp32; tied tensors are counted once."""
    quantized = [m for m in model.modules() if is_quantized(m)]
    linear = sum(weight_bytes(m) for m in quantized)
    linear_fp32 = sum(full_precision_bytes(m) for m in quantized)
    packed = {id(m.weight) for m in quantized}
    seen: set[int] = set()
    other = other_fp32 = 0
    for name, param in model.named_parameters():
        if id(param) in seen or id(param) in packed or ".adapters." in name or ".copies." in name:
            continue
        seen.add(id(param))
        other += param.numel() * param.element_size()
        other_fp32 += param.numel() * 4
    return WeightBytes(len(quantized), linear, linear_fp32, linear + other, linear_fp32 + other_fp32)
