"""glibc's malloc thresholds (mallopt): the one place lorakit sets them.

Serving keeps freed memory in the process (lorakit.serve.malloc), the opt-in lean training mode
hands it back at once (lorakit.train.lean); both set the same two thresholds, to opposite ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from lorakit.allocator import in_use

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Blocks of at least `mmap_threshold` bytes are mapped (and unmapped when freed); the heap's free
    top beyond `trim_threshold` goes back to the OS. Process-wide; False where malloc is not glibc's
    (another libc, or tcmalloc / jemalloc preloaded: lorakit/allocator.py)."""
    if not sys.platform.startswith("linux") or in_use() != "system":  # tcmalloc or jemalloc: glibc's are unused
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
