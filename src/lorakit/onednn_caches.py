"""Bound oneDNN's per-shape caches, so half-precision GEMMs over varying row counts keep a steady footprint.

PyTorch runs bf16 (and some fp16) CPU GEMMs through oneDNN. Two caches keep one entry for every
distinct matrix shape they meet: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and
ideep's computation cache inside PyTorch (`LRU_CACHE_CAPACITY`), 1,024 entries each by default,
about a megabyte or two apiece on AMX. A training step's token count changes from step to step,
so each step brings new shapes and the process grows by hundreds of megabytes over a long run,
with no speed gained: a step only reuses its own handful of shapes. Both libraries read the
capacity from the environment once, at their first GEMM, so importing this module (lorakit's
__init__ does it first) sets both; a value the user set first is kept.
"""

from __future__ import annotations

import os

CACHE_CAPACITY = 32  # a training step has ~8 distinct GEMM shapes (forward and input-gradient of 4 projections)
CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
USER_SET = frozenset(name for name in CAPACITY_VARIABLES if name in os.environ)  # never overridden


def bound_onednn_caches(capacity: int = CACHE_CAPACITY) -> dict[str, str]:
    """Set both capacities in this process's environment unless already set; returns what is in force."""
    for name in CAPACITY_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in CAPACITY_VARIABLES}


def widen_onednn_caches(capacity: int) -> bool:
    """Raise both capacities (those the user did not set) for a process that meets many shapes again and
    again, as decoding does: one per batch size and weight. Takes effect only before the process's first
    oneDNN GEMM (fp32 GEMMs do not count: they run elsewhere); returns whether anything changed."""
    changed = False
    for name in CAPACITY_VARIABLES:
        if name not in USER_SET and int(os.environ.get(name, "0")) < capacity:
            os.environ[name] = str(capacity)
            changed = True
    return changed


bound_onednn_caches()
