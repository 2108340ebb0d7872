"""Keep freed memory in the process instead of handing it back to the OS (glibc's malloc).

Every mixed-adapter batch allocates its per-row adapter copies (about 150 MB for 16 requests with
rank-8 adapters on SmolLM2-135M) and frees them at the end; every decode step allocates and frees
activations and KV-cache growth. glibc serves blocks above a moving threshold with mmap and trims
the heap's free top, so the next batch page-faults the same memory back in, zeroed. Fixing the
mmap threshold at 32 MB (its largest) and trimming only beyond 1 GiB keeps that memory for reuse:
batch-of-16 generation with 16 adapters ran 8% faster here. The process's resident memory then
stays at its high-water mark, as a server's does anyway.
"""

from __future__ import annotations

from lorakit.malloc import set_malloc_thresholds

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where malloc is not glibc's."""
    return set_malloc_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
