"""A serving model's weights on transparent huge pages, for decode steps that stream them.

A decode step of a few rows reads every weight once, front to back, at memory speed. On 4 KiB pages
that stream crosses a page every 4 KiB, each a translation the CPU looks up; on 2 MiB pages it crosses
one every 2 MiB. `move_to_huge_pages` copies a serving model's tensors of at least MIN_BYTES into one
anonymous mapping advised MADV_HUGEPAGE, one after another in the model's order (as a GGUF file lays
them out), each tensor becoming a view of it; tensors that shared memory (a head tied to the embeddings)
still do; one mapping, not one per tensor, is what pays (bench/decode_speed.py times lorakit against
lorakit-4k-pages). Pages of a weights file that the copy read are let go
(mapped_pages.py). Nothing moves off Linux, where the kernel has transparent huge pages set to
"never", or with LORAKIT_HUGE_PAGES=0.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

from lorakit.mapped_pages import drop_file_pages

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MIN_BYTES = 1 << 20  # smaller tensors (norms, biases) are read from the caches anyway
ALIGN = 64  # each tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this process can ask for transparent huge pages (Linux, THP not "never", LORAKIT_HUGE_PAGES not 0)."""
    if os.environ.get("LORAKIT_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux") \
            or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _frozen_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's CPU parameters and buffers of at least MIN_BYTES, contiguous, each once, in the model's order."""
    seen, tensors = set(), []
    for tensor in [*model.parameters(), *model.buffers()]:
        if (tensor.device.type != "cpu" or not tensor.is_contiguous()
                or tensor.numel() * tensor.element_size() < MIN_BYTES or tensor.data_ptr() in seen):
            continue
        seen.add(tensor.data_ptr())
        tensors.append(tensor)
    return tensors


@torch.no_grad()
def move_to_huge_pages(model: nn.Module) -> int:
    """Copy the model's weights onto transparent huge pages (see above); returns the bytes moved (0 where nothing
    moved). For a model that only generates: a tensor's memory moves under any optimizer holding it."""
    tensors = _frozen_tensors(model) if available() else []
    if not tensors:
        return 0
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(-(-size // ALIGN) * ALIGN for size in sizes)
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive while any view of it lives
    at = -arena.data_ptr() % HUGE_PAGE  # the first tensor on a huge page's start
    moved = {}  # old data_ptr -> the tensor's new data
    for tensor, size in zip(tensors, sizes):
        old = (tensor.data_ptr(), size)
        view = arena[at : at + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        moved[old[0]] = view
        tensor.data = view
        drop_file_pages([old])  # a weights file's pages this copy read: not read again
        at += -(-size // ALIGN) * ALIGN
    for tensor in [*model.parameters(), *model.buffers()]:  # other tensors on a moved one's memory follow it
        new = moved.get(tensor.data_ptr())
        if new is not None and new.data_ptr() != tensor.data_ptr() and (new.dtype, new.shape) == (tensor.dtype,
                                                                                                tensor.shape):
            tensor.data = new
    log.info("%.0f MB of weights on transparent huge pages", sum(sizes) / 1e6)
    return sum(sizes)
