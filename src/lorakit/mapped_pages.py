"""Let go of the pages of a file-mapped tensor once its data lives elsewhere.

A model read from safetensors holds its weights in a memory map of the file. When lorakit copies
some of them into a new buffer (q/k/v and gate/up packed for one GEMM each), the file's pages that
were read for the copy stay mapped and count in the process's resident set, although nothing
reads them again: ~0.27 GB for SmolLM2-135M. `drop_file_pages` tells the kernel so (madvise
MADV_DONTNEED on the whole pages inside each span). Only spans inside a file-backed mapping are
touched; a page dropped this way is read back from the file if anything ever touches it, so the
values stay what the file holds. Anonymous memory (a model built in memory, or on a GPU) is left
alone. Linux only; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

MADV_DONTNEED = 4


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings that are backed by a file (Linux)."""
    spans = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                spans.append((low, high))
    return spans


def drop_file_pages(spans: list[tuple[int, int]]) -> int:
    """Drop the whole pages of each (address, bytes) span that lies inside a file mapping; returns bytes dropped."""
    if not sys.platform.startswith("linux") or not spans:
        return 0
    mappings = file_mappings()
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, dropped = mmap.PAGESIZE, 0
    for address, size in spans:
        if not any(low <= address and address + size <= high for low, high in mappings):
            continue
        start, end = -(-address // page) * page, (address + size) // page * page  # whole pages only
        if end > start and madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped
