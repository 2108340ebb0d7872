"""Frozen linear weights stored as int8 for generation and serving: a quarter of fp32's bytes, half of bf16's.

A decode step is mostly reading weights (infer/half_weights.py says why), so the fewer bytes a weight
takes, the faster the step. `use_int8_weights` turns every plain `nn.Linear` of the model, the output
head included, whose input width is a multiple of 16 (the kernel's; every real model's is) into an
`Int8WeightLinear` (lora/base.py): weight-only int8, symmetric, one scale per output channel
(scale = max |W_row| / 127). Decode steps of enough rows multiply them through lorakit's int8 kernel
(fp32 activations and sums, the weights widened as they are read; lora/base.py: int8_kernel_rows), other
products take bf16 activations and accumulate in fp32 inside PyTorch's own kernel
(aten::_weight_int8pack_mm). llama.cpp's q8_0 stores all 2-D weights
in int8 too, with one scale per 32 weights, and rounds the activations to int8 as well.

With the "w8a8" setting every fp32 product of these weights on the CPU (prompt and decode step alike) also rounds
its inputs to int8, per column and block of 32 inputs with one fp32 scale each (llama.cpp's q8_0 rounds
activations the same way), and sums each block's products exactly in int32 through lorakit's kernel, with AVX-512
VNNI's 4-way int8 dot products where the CPU has them (lora/weight_kernel.c: w8a8_product): a decode step reads a
quarter of fp32's bytes and does about a third of its instructions, where the weight-only kernel widens every
weight to fp32 and does as many as fp32.

LoRA layers wrap these bases as they wrap any Linear, and their adapters' terms, the embeddings, the
norms, attention and the KV cache stay fp32. A head tied to the embeddings gets its own int8 copy;
the embeddings stay fp32. Adapters cannot be merged into an int8 weight (lora/base.py's quantised
backend protocol refuses it, as for QLoRA's bases). Outputs are close to the fp32 model's, not equal.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.lora.base import INT8_IN_MULTIPLE, Int8WeightLinear, plain_linear, register_quantized_backend
from lorakit.lora.weight_kernel import W8A8_BLOCK
from lorakit.train.half_base import leave_the_weights_file

QUANTIZE_SETTINGS = ("off", "int8", "w8a8")


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of an (out, in) weight: (int8 (out, in), bf16 scales (out,)).

    The scale is rounded to bf16 before the weight is divided by it, so that int8 * scale is the
    weight the kernel computes with."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    q = (weight / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_linear_from(linear: nn.Linear) -> Int8WeightLinear:
    """An Int8WeightLinear computing what `linear` computes, to int8 rounding (a new module; `linear` is unchanged)."""
    q, scales = int8_rows(linear.weight)
    out = Int8WeightLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(q, requires_grad=False)
    out.register_buffer("weight_scales", scales)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return out


class Int8WeightsBackend:
    """lora.base's QuantizedBackend for Int8WeightLinear: LoRA reads its weight dequantised and never merges into it."""

    @staticmethod
    def claims(module: nn.Module) -> bool:
        return type(module) is Int8WeightLinear

    @staticmethod
    def dequantize(module: nn.Module) -> torch.Tensor:
        return module.weight.float() * module.weight_scales.float()[:, None]

    @staticmethod
    def nbytes(module: nn.Module) -> int:
        return module.weight.numel() + module.weight_scales.numel() * module.weight_scales.element_size()

    @staticmethod
    def to_plain(module: nn.Module) -> nn.Linear:
        return plain_linear(module, Int8WeightsBackend.dequantize(module))


register_quantized_backend(Int8WeightsBackend())


@torch.no_grad()
def use_int8_weights(model: nn.Module, setting: str = "int8") -> str | None:
    """Store the model's plain fp32 linear weights (the head's too) as int8 when `setting` is "int8" or "w8a8", those
    of an input width the kernel takes; with "w8a8" their products also round the activations to int8 (per column
    and block of 32 inputs, as llama.cpp's q8_0; layers of another input width keep fp32 activations). Returns the
    setting, or None for "off".

    Raises:
        ValueError: an unknown setting, or a model that is not on the CPU.
    """
    if setting not in QUANTIZE_SETTINGS:
        raise ValueError(f"quantize: expected one of {', '.join(QUANTIZE_SETTINGS)}, got {setting!r}")
    if setting == "off":
        return None
    linears = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.in_features % INT8_IN_MULTIPLE == 0]
    if any(m.weight.device.type != "cpu" for _, m in linears):
        raise ValueError("int8 weights run on the CPU only, and this model is not on it; leave --quantize off")
    for name, linear in linears:
        quantized = int8_linear_from(linear)
        quantized.int8_activations = setting == "w8a8" and linear.in_features % W8A8_BLOCK == 0
        model.set_submodule(name, quantized)
    if linears and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head is int8 now, the embeddings fp32: never tie them again
    leave_the_weights_file(model)  # the fp32 pages the quantisation read would otherwise stay resident
    return setting
