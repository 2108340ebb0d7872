"""keep_freed_memory: a freed 8 MB block stays in the process (glibc), where by default it goes back."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
from lorakit.serve.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = resident()
block = bytearray(8 << 20)  # malloc'd and touched (zeroed) page by page
block = None
print(resident() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's malloc")
def test_freed_block_stays_resident_only_when_kept():
    def grown(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert grown("default") < 1 << 20  # mmap'd by default, unmapped on free
    assert grown("keep") >= 7 << 20  # from the heap, kept for the next allocation


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's malloc")
def test_glibcs_thresholds_are_not_claimed_set_on_a_preloaded_allocator():
    from lorakit import allocator

    env = allocator.preload_env({"PATH": "/usr/bin", allocator.ENV: "tcmalloc"}) if allocator.library("auto") else None
    if env is None:
        pytest.skip("tcmalloc is not installed (make setup installs it)")
    probe = "from lorakit.serve.malloc import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
