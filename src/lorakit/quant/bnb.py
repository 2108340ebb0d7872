"""The bitsandbytes backend: build a 4-bit or 8-bit copy of an nn.Linear, and read it back.

The protocol every quantised base answers (and all the rest of lorakit uses):

    is_quantized(module)        a Linear whose weight is stored packed (Params4bit / Int8Params)
    quantize_linear(linear, c)  the bitsandbytes replacement of a plain nn.Linear, on its device
    dequantized_weight(module)  the (out, in) float32 weight the quantised matmul computes with
    weight_bytes(module)        bytes the stored weight takes, scales and code books included

4-bit (QLoRA): `Linear4bit`, blocks of 64 weights share one absmax scale; NF4 places its 16 levels
at the quantiles of a normal distribution. Double quantisation stores those scales in 8 bits
(blocks of 256) instead of fp32: 0.5 + 1/64 + 4/(64*256) bytes per weight instead of 0.5 + 4/64.
8-bit: `Linear8bitLt`, one absmax per output row (LLM.int8, outliers above `INT8_THRESHOLD` in fp).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorakit.config import QuantizationConfig
from lorakit.lora.base import plain_linear
from lorakit.models import DTYPES

log = logging.getLogger(__name__)

INT8_THRESHOLD = 6.0  # transformers' llm_int8_threshold default


class _DropNotice(logging.Filter):
    """Drops one expected bitsandbytes warning (the rest pass)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# logger -> expected notice: on AVX512-BF16 CPUs, that an optional Hub kernel is missing (the
# fallback is bitsandbytes' own C++ kernel, and the Hub one needs a network); and, on every 8-bit
# matmul, that LLM.int8 quantises its fp32 input through fp16 (how it works, not a problem).
_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "kernels-community",
    "bitsandbytes.autograd._functions": "inputs will be cast from",
}


def bnb():
    """Import bitsandbytes, with its expected notices silenced."""
    for name, text in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(text))
    import bitsandbytes

    return bitsandbytes


def compute_dtype(config: QuantizationConfig, device: torch.device) -> torch.dtype:
    """The configured compute dtype, or by default bf16 on CUDA and fp32 elsewhere (bf16 matmul is slow on CPU)."""
    if config.compute_dtype is not None:
        return DTYPES[config.compute_dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear whose weight is stored packed (without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(weight).__name__ in ("Params4bit", "Int8Params")


@torch.no_grad()
def quantize_linear(linear: nn.Linear, config: QuantizationConfig) -> nn.Linear:
    """A frozen bitsandbytes copy of `linear` on its device (quantised as it moves there).

    The bias is kept as it is (full precision); only the weight is quantised.
    """
    lib = bnb()
    device = linear.weight.device
    weight = linear.weight.detach().float()
    has_bias = linear.bias is not None
    if config.bits == 4:
        new = lib.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype(config, device),
            compress_statistics=config.double_quant,
            quant_type=config.type,
            device="meta",
        )
        new.weight = lib.nn.Params4bit(
            weight.cpu(),
            requires_grad=False,
            compress_statistics=config.double_quant,
            quant_type=config.type,
            module=new,
        )
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight for inference on the first no-grad
        # eval forward, rounding its scales to bf16: train and eval outputs would then differ
        # (~1e-2) and the stored weight would no longer match what was saved. Keep one format.
        new.support_avx512bf16_for_cpu = False
    else:
        new = lib.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        new.weight = lib.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().clone().cpu(), requires_grad=False)
    return new.to(device).train(linear.training)  # LLM.int8 computes differently in training mode


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight of a quantised Linear (a plain Linear's weight, as float32)."""
    if not is_quantized(module):
        return module.weight.detach().float()
    lib = bnb()
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return lib.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if weight.SCB is not None else module.state.SCB  # moved to state after a forward
    return lib.functional.int8_vectorwise_dequant(weight.data, scb).float()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the stored weight: packed data plus its scales (and double-quant scales, code books)."""
    weight = module.weight
    total = weight.numel() * weight.element_size()
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        extras = [state.absmax, state.code]
        if state.nested:
            extras += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(t.numel() * t.element_size() for t in extras if torch.is_tensor(t))
    elif type(weight).__name__ == "Int8Params":
        scb = weight.SCB if weight.SCB is not None else module.state.SCB
        total += scb.numel() * scb.element_size()
    return total


class BitsAndBytesBackend:
    """lora.base's QuantizedBackend for bitsandbytes' Linear4bit / Linear8bitLt."""

    claims = staticmethod(is_quantized)
    dequantize = staticmethod(dequantized_weight)
    nbytes = staticmethod(weight_bytes)

    @staticmethod
    def to_plain(module: nn.Module) -> nn.Linear:
        return to_plain_linear(module)


def full_precision_bytes(module: nn.Module) -> int:
    """Bytes the weight takes in float32 (out * in * 4)."""
    return module.out_features * module.in_features * 4


def to_plain_linear(module: nn.Module) -> nn.Linear:
    """A float32 nn.Linear computing what the quantised `module` computes (up to the compute dtype)."""
    return plain_linear(module, dequantized_weight(module))
