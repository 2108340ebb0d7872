"""Dropout's keep mask for the fused LoRA paths: `torch.rand_like(x) >= p`, the same draws, faster; and the mask
applied (`dropped`, `drop_`): x * keep, the same numbers, in one pass.

LoRA dropout draws a mask over every adapted layer's input each step. PyTorch fills rand_like on the CPU
one draw at a time under its generator's lock, about 3.5 ns a draw on a 2-core EPYC: 14-16% of a profiled
SmolLM2-135M training step with lora_dropout 0.05. `keep_mask(x, p)` draws the same numbers from the same generator
(PyTorch's MT19937, whose state it reads and writes back through torch.get_rng_state/set_rng_state) in
lorakit's C kernel (dropout_mask.c), so masks, trained adapters and resumed runs are what they were, bit for
bit, in a fraction of the time. The first call in a process checks the kernel against rand_like itself and
keeps to rand_like if they ever differ (another PyTorch's generator); a tensor off the CPU, not contiguous
or not fp32 goes through rand_like too, and so does every tensor where LORAKIT_DROPOUT_KERNEL=0 (read at that
first call).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from functools import cache
from pathlib import Path

import torch

from lorakit import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
STATE_BYTES = 5056  # torch.get_rng_state()'s size on the CPU: the layout below
_LEFT, _NEXT, _WORDS = 8, 16, 24  # byte offsets of left (int32), next (uint64) and the 624 words (uint64 each)
_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32]


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """torch.rand_like(x) >= p as a bool tensor of x's shape, drawn from the default CPU generator."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and 0 < p < 1 and _works()):
        return torch.rand_like(x) >= p  # (a half x draws 8 or 11 bits a value: another mask)
    return _drawn(x.shape, p)


def dropped(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x * keep for a bool mask of x's shape: the same numbers, through the kernel where it applies (fp32 CPU
    tensors outside autograd), without the fp32 copy of the mask PyTorch makes before multiplying."""
    if not _multiplies(x, keep):
        return x * keep
    out = torch.empty_like(x)
    _load().apply_mask(x.data_ptr(), keep.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


def drop_(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t.mul_(keep) in place, as `dropped` multiplies."""
    if not _multiplies(t, keep):
        return t.mul_(keep)
    _load().apply_mask(t.data_ptr(), keep.data_ptr(), t.data_ptr(), t.numel(), torch.get_num_threads())
    return t


def _multiplies(x: torch.Tensor, keep: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == keep.device.type == "cpu" and keep.dtype == torch.bool
            and keep.shape == x.shape and x.is_contiguous() and keep.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad) and _works())


def _drawn(shape, p: float) -> torch.Tensor:
    keep = torch.empty(shape, dtype=torch.bool)
    state = torch.get_rng_state()
    base = state.data_ptr()
    failed = _load().keep_mask(base + _WORDS, base + _LEFT, base + _NEXT, keep.data_ptr(), keep.numel(),
                               _threshold(p))
    if failed:
        raise RuntimeError("the CPU generator's state is not MT19937's as lorakit reads it")
    torch.set_rng_state(state)
    return keep


@cache
def _threshold(p: float) -> int:
    """The kept draws' least low 24 bits m: rand_like's value m / 2^24 >= p as a float32, m >= float32(p) 2^24."""
    return math.ceil(float(torch.tensor(p, dtype=torch.float32)) * (1 << 24))


@cache
def _load():
    """The kernel's library, called holding the GIL (ctypes.PyDLL): no other Python thread draws from the
    generator between reading its state and writing it back."""
    library = native.load_library(SOURCE, native.FLAGS, what="the dropout mask kernel (torch.rand_like serves)")
    if library is None:
        return None
    library = ctypes.PyDLL(library._name)
    library.keep_mask.argtypes, library.keep_mask.restype = _ARGS, ctypes.c_int
    library.apply_mask.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    library.apply_mask.restype = None
    return library


@cache
def _works() -> bool:
    """Whether the kernel is on (LORAKIT_DROPOUT_KERNEL), built, and draws what rand_like draws here: checked once
    per process on 3001 draws from a copy of the generator's state (crossing a twist of it), which is restored."""
    if os.environ.get("LORAKIT_DROPOUT_KERNEL", "1") == "0" or _load() is None:
        return False
    saved = torch.get_rng_state()
    try:
        if saved.numel() != STATE_BYTES:
            return False
        x = torch.empty(3001)
        want = torch.rand_like(x) >= 0.3
        after = torch.get_rng_state()
        torch.set_rng_state(saved)
        same = torch.equal(_drawn(x.shape, 0.3), want) and torch.equal(torch.get_rng_state(), after)
    except RuntimeError:
        same = False
    finally:
        torch.set_rng_state(saved)
    if not same:
        log.warning("lorakit's dropout mask kernel does not draw what this PyTorch draws; rand_like serves")
    return same
