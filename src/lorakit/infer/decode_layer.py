"""A decode step's whole decoder layer in one C call (decode_layer.c), for 1 to 4 rows of an fp32 model.

At one to a few rows a decode step's products run at memory speed through the few-columns kernel, and
what is left is the twenty-odd small torch operations a layer around them, each with its dispatch and
Python. `run` computes a layer of a Llama-family model in one call instead, where every one of its seven
projections is a frozen fp32 Linear (`lora.base.FrozenLinear`: a merged or base model that serves; a LoRA
layer in a mixed batch keeps infer/decode_step.py's walk), or every one a w8a8 Int8WeightLinear (`lorakit
serve --quantize w8a8`: int8 weights, inputs rounded to int8, the bits of lorakit's w8a8 product, where the CPU
has AVX-512 VNNI), the step has rows only (no prompt beside them),
the few-columns kernel is this process's choice for that many rows (`lora.base.decode_layouts`), and the
layer's cache appends in place (`kv_cache.RoomyLayer`); else it returns False and the step computes the
layer with torch. The results are the torch walk's up to float rounding (the attention sums its tokens in
order). LORAKIT_DECODE_LAYER=0 leaves it out.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from lorakit import native
from lorakit.infer.kv_cache import RoomyLayer
from lorakit.lora import weight_kernel
from lorakit.lora.base import FrozenLinear, Int8WeightLinear, decode_layouts, fp32_scales

SOURCE = Path(__file__).with_suffix(".c")
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # decode_layer.c's order
NORMS = ("input_layernorm", "post_attention_layernorm")


@cache
def _library():
    if os.environ.get("LORAKIT_DECODE_LAYER", "1") == "0":
        return None
    library = native.load_library(SOURCE, weight_kernel.FLAGS, what="the decode step's layer kernel (torch serves)")
    if library is not None:
        pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        library.decode_layer.argtypes = [pointer, size, pointer, pointer, pointer, pointer, real, pointer, pointer,
                                         pointer, pointer, pointer, pointer, size, pointer, real, ctypes.c_int]
        library.decode_layer.restype = ctypes.c_int
        library.decode_layer_w8a8.argtypes, library.decode_layer_w8a8.restype = [], ctypes.c_int
    return library


def serves(rows: int) -> bool:
    """Whether the layer kernel is built and the few-columns product is this process's layout for `rows` rows."""
    return 1 <= rows <= weight_kernel.FEW_COLUMNS and _library() is not None and decode_layouts()[rows] == "few"


def _fp32(tensor: torch.Tensor | None) -> bool:
    return tensor is None or (tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous())


@dataclass(frozen=True)
class _Plan:
    """A layer's arguments to the kernel, kept while its tensors stay where and what they were (`where`)."""

    where: tuple
    weights: ctypes.Array
    biases: ctypes.Array
    scales: ctypes.Array | None  # w8a8 weights' fp32 scales; None for fp32 weights
    norms: ctypes.Array
    dims: ctypes.Array  # hidden size, heads, key/value heads, head size, the MLP's width
    eps: float
    scale: float


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder layer -> its _Plan


def _tensors(layer: nn.Module) -> tuple[list, list | None] | None:
    """The layer's 7 projections' weights and biases (decode_layer.c's order), then its 2 norms' weights, and the
    projections' modules where all 7 are w8a8 (else None); None where the projections are not all FrozenLinear or
    all w8a8 Int8WeightLinear."""
    blocks, tensors = {block: layer._modules[block]._modules for block in ("self_attn", "mlp")}, []
    modules = [blocks[block].get(name) for block, name in PROJECTIONS]
    int8 = all(type(m) is Int8WeightLinear and m.int8_activations for m in modules)
    if not int8 and any(type(m) is not FrozenLinear for m in modules):
        return None
    for module in modules:
        tensors += (module._parameters["weight"], module._parameters["bias"])
    return tensors + [layer._modules[name]._parameters["weight"] for name in NORMS], modules if int8 else None


def _plan(layer: nn.Module, config) -> _Plan | None:
    """The layer's kernel arguments (made anew when a tensor moved), or None where the kernel does not take it."""
    found = _tensors(layer)
    if found is None:
        return None
    tensors, int8 = found
    where = tuple(None if t is None else (t.data_ptr(), t.dtype, t.shape) for t in tensors)
    if int8:  # the scales the kernel's fp32 copies are made from, and whether they changed in place
        where += tuple((m.weight_scales.data_ptr(), m.weight_scales._version) for m in int8)
    plan = _plans.get(layer)
    if plan is not None and plan.where == where:
        return plan
    scales = None if int8 is None else [fp32_scales(m) for m in int8]  # kept by each module
    norms = [layer._modules[name] for name in NORMS]
    weights_ok = all(_fp32(t) for t in tensors[0:14:2]) if scales is None else (
        _library().decode_layer_w8a8() == 1 and all(_fp32(s) for s in scales)
        and all(w.dtype == torch.int8 and w.is_contiguous() and w.shape[1] % 32 == 0 for w in tensors[0:14:2]))
    if (not weights_ok or not all(_fp32(t) for t in tensors[1:14:2] + tensors[14:])
            or len({getattr(n, "variance_epsilon", None) for n in norms}) != 1
            or getattr(config, "hidden_act", "silu") != "silu"):
        return None
    attn, weights = layer._modules["self_attn"], tensors[0:14:2]
    hidden, width = weights[0].shape[1], weights[-1].shape[1]
    attended, kv = config.num_attention_heads * attn.head_dim, config.num_key_value_heads * attn.head_dim
    shapes = [(attended, hidden), (kv, hidden), (kv, hidden), (hidden, attended), (width, hidden), (width, hidden),
              (hidden, width)]  # the shapes decode_layer.c takes them in
    if [tuple(w.shape) for w in weights] != shapes or any(
            b is not None and b.shape != (w.shape[0],) for w, b in zip(weights, tensors[1:14:2])) or any(
            t.shape != (hidden,) for t in tensors[14:]):
        return None
    pointers = [None if t is None else t.data_ptr() for t in tensors]
    plan = _Plan(where, (ctypes.c_void_p * 7)(*pointers[0:14:2]), (ctypes.c_void_p * 7)(*pointers[1:14:2]),
                 None if scales is None else (ctypes.c_void_p * 7)(*[s.data_ptr() for s in scales]),
                 (ctypes.c_void_p * 2)(*pointers[14:]),
                 (ctypes.c_int64 * 5)(hidden, config.num_attention_heads, config.num_key_value_heads, attn.head_dim,
                                      width),
                 norms[0].variance_epsilon, attn.scaling)
    _plans[layer] = plan
    return plan


def run(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor,
        cache_layer, config) -> bool:
    """Compute decoder `layer` for a step's rows in place on the residual stream `hidden` (H, B), fp32 and
    contiguous, appending their keys and values to `cache_layer`; False (nothing changed) where it does not serve.

    Args:
        cos, sin: (B, D) each row's rotary embedding, fp32 and contiguous.
        keep: (B, T), fp32 and contiguous: 0 where the row attends to a cached token (this step's included), -inf on
            its left padding.
    """
    rows = hidden.shape[1]
    plan = _plan(layer, config) if serves(rows) else None
    if plan is None or type(cache_layer) is not RoomyLayer or not cache_layer.is_initialized:
        return False
    _, _, kv_heads, head_dim, _ = plan.dims
    cached = cache_layer.keys
    if (cached.shape != (rows, kv_heads, cached.shape[2], head_dim) or cached.dtype != torch.float32
            or hidden.shape[0] != plan.dims[0] or cos.shape != (rows, head_dim) or sin.shape != cos.shape
            or keep.shape != (rows, cached.shape[2] + 1) or not all(_fp32(t) for t in (hidden, cos, sin, keep))):
        return False
    keys, values = cache_layer.reserve(1)  # (B, kv heads, T, D) contiguous rooms' views, the new token unwritten
    status = _library().decode_layer(
        hidden.data_ptr(), rows, plan.weights, plan.biases, plan.scales, plan.norms, plan.eps, plan.dims,
        cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), (ctypes.c_int64 * 3)(*keys.stride()[:3]),
        keys.shape[2], keep.data_ptr(), plan.scale, torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the decode layer kernel could not allocate its working memory")
    return True
