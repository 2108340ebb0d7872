"""lorakit/process_memory.py: a process's own peak memory, and the peak a training run reports."""

import subprocess
import sys

import pytest
import torch

from lorakit.process_memory import peak_memory, peak_rss_mb

CHILD = """
import torch
from lorakit.process_memory import peak_rss_mb
before = peak_rss_mb()
block = torch.ones(64 << 20)  # 256 MB, touched
del block
print(before, peak_rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_peak_is_the_processs_own_and_keeps_its_high_water_mark():
    """A child spawned while this process holds 1.2 GB starts from its own memory, not the spawner's (as ru_maxrss
    would), and its peak stays up after what raised it is freed."""
    held = torch.ones(300 << 20)  # 1.2 GB, touched
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    assert float(held[-1]) == 1.0
    before, after = map(float, out.stdout.split())
    assert before < 800, out.stdout
    assert after - before > 200, out.stdout


def test_peak_memory_reports_the_rss_and_no_gpu_figure_on_the_cpu():
    memory = peak_memory(torch.device("cpu"))
    assert set(memory) == {"peak_rss_mb"}
    assert 0 < memory["peak_rss_mb"] <= peak_rss_mb() + 1
