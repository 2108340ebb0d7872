"""lorakit's small C kernels: compiled once per machine with the system's C compiler, loaded with ctypes.

A kernel is one C source beside its Python module (lora/column_kernel.c, lora/weight_kernel.c). It is
built with `cc` (or $CC) and OpenMP into the cache folder (`$LORAKIT_CACHE/kernels/<name>-<hash>.so`,
written atomically), the hash covering the source, the flags, the compiler's version and the CPU's
flags, and loaded after torch, so that its `libgomp.so.1` resolves to the copy torch loaded and its
threads are torch's. No torch headers, no ninja: about a second to build.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

from lorakit.models import cache_root

log = logging.getLogger(__name__)

# Vector loops are built without alignment peeling, so that a sum does not depend on where its data lies.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC", "--param=vect-max-peeling-for-alignment=0"]


def load_library(source: Path, flags: list[str] = FLAGS, what: str = "a C kernel") -> ctypes.CDLL | None:
    """The built library of `source`, built on first use; None where it cannot be built here (another
    platform, no compiler: logged as a warning naming `what`)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        return ctypes.CDLL(str(built(source, flags)))
    except (OSError, subprocess.CalledProcessError) as error:
        text = str(error).strip()
        log.warning("%s could not be built (%s)", what, text.splitlines()[-1] if text else type(error).__name__)
        return None


def built(source: Path, flags: list[str] = FLAGS) -> Path:
    """The shared library for this source, flags, compiler and CPU, compiled into the cache when missing."""
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        _source_bytes(source) + " ".join(flags).encode() + version.encode() + cpu_flags().encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)  # atomic: a concurrent build or a crash never leaves half a library
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _source_bytes(source: Path) -> bytes:
    """The source and the local headers it includes (`#include "name.h"` beside it), so that editing one builds anew."""
    text = source.read_bytes()
    headers = re.findall(rb'^#include "([^"]+)"', text, flags=re.MULTILINE)
    return text + b"".join((source.parent / name.decode()).read_bytes() for name in headers)


def cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), so another CPU sharing the cache builds its own."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
