"""This process's peak memory: what `lorakit train` reports at the end of a run, and the benches measure."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's high-water mark of its own memory (VmHWM). ru_maxrss
    (the fallback elsewhere) also counts, for a spawned process, the memory of the process that spawned it."""
    try:
        with open("/proc/self/status") as fh:
            return int(fh.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_memory(device) -> dict[str, float]:
    """{"peak_rss_mb": ...} and, for a CUDA device (a torch.device), {"peak_gpu_mb": ...}: the most PyTorch's
    allocator reserved on it."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        import torch  # only here: the benches' reports read this module without torch

        out["peak_gpu_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out
