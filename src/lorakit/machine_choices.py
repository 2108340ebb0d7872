"""Choices made by timing, remembered per machine, so that every process on it computes alike.

A few choices lorakit makes by timing two ways of the same work against each other (oneDNN or MKL for fp32
products: lora/onednn_linear.py; a half-type frozen base: train/half_base.py; how a decode step's products read
their few rows, and from how many rows lorakit's int8 kernel multiplies: lora/base.py). The ways round differently,
so a choice changes a run's numbers in their last bits. Timed anew in every process, a noisy moment could
decide one way in one process and the other way in the next: a resumed run then did not continue its first
process's numbers, and two runs of one config differed. `remembered(name, measure)` times once per machine
(its CPU, torch's version and thread count) and keeps the answer in LORAKIT_CHOICES (default: the cache
folder's choices/); LORAKIT_RETIME=1 times again and keeps the new answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from lorakit.models import cache_root
from lorakit.native import cpu_flags

T = TypeVar("T")


def folder() -> Path:
    """Where the answers are kept: LORAKIT_CHOICES, else the cache folder's choices/ (read on every call)."""
    return Path(os.environ.get("LORAKIT_CHOICES") or cache_root() / "choices").expanduser()


def remembered(name: str, measure: Callable[[], T]) -> T:
    """`measure()`'s answer (JSON: a bool, a string, None...) as first measured on this machine for `name`."""
    key = f"{name}|torch {torch.__version__}|{torch.get_num_threads()} threads|{cpu_flags()}"
    path = folder() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if os.environ.get("LORAKIT_RETIME", "0") != "1":
        try:
            return json.loads(path.read_text())["answer"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not measured here yet, or a file that is not ours: measure
    answer = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        json.dump({"name": name, "answer": answer}, out)
    os.replace(tmp, path)  # atomic: a process reading it sees a whole answer
    return answer
