"""A half-precision frozen base, where this CPU multiplies halves faster than fp32.

Some CPUs run fp16 or bf16 GEMMs faster than fp32 (AVX-512 FP16, AMX); many (AVX2 only) run them
several times slower. `train.half_base: auto` times the three at one of the model's own shapes
(once per machine: lorakit/machine_choices.py) before training and keeps the frozen weights of the
LoRA layers in the fastest half type only where it beats fp32 by HALF_MARGIN; `off` never casts,
`fp16`/`bf16` cast without asking.

What stays fp32: the LoRA A and B (and their optimizer state), activations between layers, norms,
embeddings and the head's weight. Each base GEMM multiplies in the weight's type (the GEMM accumulates in
fp32 inside) and hands its result on as fp32 (lora/base.py: `base_linear`, `base_input_grad`).
Only layers on the fused path with a plain LoRA adapter are cast; the base keeps the half type
for the rest of the process (a merge into it rounds to that type). A frozen output head (often tied to
the embeddings, which stay fp32) also gets a half copy of its weight for the loss's two products
(`half_head_weight`, train/loss.py): a vocabulary-wide GEMM, which in fp32 took a sixth of a step.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from lorakit.lora.adapters import lora_layers
from lorakit.lora.variants import LoraAdapter
from lorakit.machine_choices import remembered
from lorakit.mapped_pages import drop_file_pages

log = logging.getLogger(__name__)

HALF_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
HALF_MARGIN = 0.9  # a half type must take at most this share of fp32's time
# `auto` leaves smaller models in fp32 without timing: their GEMMs take microseconds, too little for
# a half type to pay or for a timing to decide the same way twice (SmolLM2-135M's widest is 576 x 1536).
MIN_PROBED_WEIGHT = 512 * 512
PROBE_ROWS = 256


def gemm_seconds(dtype: torch.dtype, rows: int, in_features: int, out_features: int, repeats: int = 3) -> float:
    """Fastest of `repeats` timings of x (rows, in) @ W^T (in, out) in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    torch.nn.functional.linear(x, weight)  # warm-up: kernel choice, first-touch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return best


def probe_half_type(in_features: int, out_features: int, rows: int = PROBE_ROWS) -> tuple[str | None, dict[str, float]]:
    """(the half type to use or None, seconds per GEMM of fp32, fp16 and bf16) at (rows, in, out)."""
    seconds = {name: gemm_seconds(dtype, rows, in_features, out_features)
               for name, dtype in {"fp32": torch.float32, **HALF_TYPES}.items()}
    name = min(HALF_TYPES, key=seconds.__getitem__)
    return (name if seconds[name] <= HALF_MARGIN * seconds["fp32"] else None), seconds


def _logged_probe(in_features: int, out_features: int, rows: int) -> str | None:
    name, seconds = probe_half_type(in_features, out_features, rows)
    log.info("half-precision probe at (%d, %d, %d): %s -> %s", rows, in_features, out_features,
             {k: f"{v * 1e3:.3f} ms" for k, v in seconds.items()}, name or "fp32 (no half type is faster)")
    return name


def auto_half_type(in_features: int, out_features: int, rows: int) -> str | None:
    """`auto`'s choice for a model whose widest weight is (out, in): None below MIN_PROBED_WEIGHT, else the
    probe's, as first measured on this machine (lorakit/machine_choices.py). In a distributed run every
    process takes rank 0's choice, so the replicas compute alike."""
    name = None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    if in_features * out_features >= MIN_PROBED_WEIGHT and (not distributed or torch.distributed.get_rank() == 0):
        # timed once per machine: every process casts alike; in a distributed run rank 0 alone reads or times it
        name = remembered(f"half-base {rows}x{in_features}x{out_features}",
                          lambda: _logged_probe(in_features, out_features, rows))
    if distributed:
        choice = [name]
        torch.distributed.broadcast_object_list(choice, src=0)
        name = choice[0]
    return name


def castable_layers(model: nn.Module) -> list:
    """LoRA layers on the fused path with one plain LoRA adapter on an fp32 Linear base."""
    return [
        layer for _, layer in lora_layers(model)
        if layer.can_fuse() and type(layer.adapters[layer.active[0]]) is LoraAdapter
        and layer.kind == "linear" and layer.base_layer.weight.dtype == torch.float32
    ]


@torch.no_grad()
def use_half_base(model: nn.Module, setting: str = "auto") -> str | None:
    """Cast the frozen LoRA bases to a half type as `setting` (auto | off | fp16 | bf16) says; returns the type used."""
    layers = castable_layers(model)
    device = next(model.parameters()).device
    if setting == "off" or not layers or device.type != "cpu":  # on a GPU, train.precision does this job
        return None
    name = setting
    if setting == "auto":
        widest = max(layers, key=lambda layer: layer.base_layer.weight.numel()).base_layer.weight
        name = auto_half_type(widest.shape[1], widest.shape[0], PROBE_ROWS)
        if name is None:
            return None
    for layer in layers:
        base = layer.base_layer
        for param in (base.weight, base.bias):
            if param is not None:
                read = [(param.data_ptr(), param.numel() * param.element_size())] if param.is_contiguous() else []
                param.data = param.data.to(HALF_TYPES[name])
                drop_file_pages(read)  # a weights file's pages this cast read: not read again, not kept resident
    leave_the_weights_file(model)
    keep_half_head(model, HALF_TYPES[name])
    return name


@torch.no_grad()
def keep_half_head(model: nn.Module, dtype: torch.dtype) -> bool:
    """Give a frozen, bias-free Linear output head a copy of its weight in `dtype` for the loss's products
    (the weight itself, maybe tied to the input embeddings, stays as it is); False where the head is not one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.requires_grad \
            or head.weight.dtype != torch.float32:
        return False
    weight = head.weight
    head.__dict__["_half_weight"] = (weight, weight._version, weight.detach().to(dtype))
    return True


def half_head_weight(head: nn.Module) -> torch.Tensor:
    """The half copy `keep_half_head` made of the head's weight while that weight is unchanged, else the weight."""
    kept = head.__dict__.get("_half_weight")
    if kept is not None and kept[0] is head.weight and kept[1] == head.weight._version:
        return kept[2]
    return head.weight


def half_base_in_use(model: nn.Module) -> bool:
    """Whether any LoRA layer's frozen Linear base is kept in a half type (by `use_half_base`)."""
    return any(layer.kind == "linear" and layer.base_layer.weight.dtype in HALF_TYPES.values()
               for _, layer in lora_layers(model))


@torch.no_grad()
def leave_the_weights_file(model: nn.Module) -> None:
    """Copy the frozen fp32 tensors left (embeddings, norms, head) into the process's own memory.

    A model loaded from safetensors reads its weights through a memory map of the file, and the
    file stays mapped while any tensor of it lives; the fp32 pages the cast above read would then
    stay resident beside their half copies, and the half base would take more memory than fp32.
    """
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.clone()
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.dtype == torch.float32:
                module._buffers[key] = buffer.clone()
