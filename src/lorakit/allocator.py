"""The memory allocator `lorakit train` runs on: tcmalloc where it is installed, else the system's.

A training step frees its activations and allocates them again at the next step's shapes, which
change with every batch. glibc's malloc serves them from its heap after the first few frees and
splits its free blocks to fit each new size, so the heap holds freed pieces it cannot reuse: on
SmolLM2-135M with the half base, training peaked at ~1.46 GB on glibc against ~1.17 GB of tensors
alive at once (measured by mapping every block, which re-faults each step's memory and ran at
~0.55x the speed). tcmalloc keeps freed pages in its own page-level free lists, coalesced, and
reuses them without asking the kernel: ~1.24 GB at glibc's speed. PyTorch's CPU launcher
(torch.backends.xeon.run_cpu) preloads tcmalloc or jemalloc for the same reason.

An allocator is chosen when a process starts (LD_PRELOAD), so the `lorakit train` command, run as
`lorakit train` or `python -m lorakit train` (torchrun's workers too), replaces itself once with
the same command on the chosen allocator, before anything heavy is imported. `LORAKIT_MALLOC`
says which: `auto` (default: tcmalloc when installed, else the system's), `system`, `tcmalloc`,
`jemalloc`, or the path of an allocator's shared library. Linux only; elsewhere nothing changes.
A library imported from Python keeps the process's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

ENV = "LORAKIT_MALLOC"
CHOICES = ("auto", "system", "tcmalloc", "jemalloc")
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}  # Debian's
COMMANDS = ("train",)  # the commands that re-execute on it
# tcmalloc writes a line for each allocation above 1 GiB (a 1.5B model's embedding nearly is one).
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


class AllocatorError(ValueError):
    """LORAKIT_MALLOC names an allocator that is not known or not installed."""


def library(setting: str) -> str | None:
    """The shared library `setting` stands for (a name the dynamic linker finds, or a path); None: the system's."""
    if setting == "system" or not sys.platform.startswith("linux"):
        return None
    if setting in LIBRARIES or setting == "auto":
        found = next(filter(None, map(ctypes.util.find_library, LIBRARIES.get(setting, LIBRARIES["tcmalloc"]))), None)
        if found is None and setting != "auto":
            raise AllocatorError(f"{ENV}={setting}: lib{LIBRARIES[setting][0]} is not installed "
                                 f"(Debian: apt-get install {PACKAGES[setting]}); expected one of {', '.join(CHOICES)}")
        return found
    if not Path(setting).is_file():
        raise AllocatorError(f"{ENV}={setting}: expected one of {', '.join(CHOICES)} or the path of an allocator's "
                             "shared library")
    return setting


def preload_env(env: dict | os._Environ | None = None) -> dict:
    """A copy of `env` (default: this process's) that starts a process on the allocator LORAKIT_MALLOC chooses."""
    env = dict(os.environ if env is None else env)
    chosen = library(env.get(ENV, "auto") or "auto")
    preloaded = env.get("LD_PRELOAD", "").split()
    if chosen is None or chosen in preloaded:
        return env
    return {**QUIET, **env, "LD_PRELOAD": " ".join([chosen, *preloaded])}


def in_use() -> str:
    """The allocator this process runs on: tcmalloc, jemalloc or system (what /proc/self/maps shows loaded)."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return "system"
    return next((name for name in LIBRARIES if f"lib{name}" in maps), "system")


def launched_command(argv: list[str]) -> str | None:
    """The lorakit command an interpreter's original command line runs (`lorakit train ...`,
    `python [flags] -m lorakit train ...`), else None."""
    rest = None
    if len(argv) > 1 and Path(argv[1]).name == "lorakit":
        rest = argv[2:]
    elif "-m" in argv[1:]:
        at = argv.index("-m", 1)
        rest = argv[at + 2 :] if argv[at + 1 : at + 2] == ["lorakit"] else None
    return next((word for word in rest or [] if not word.startswith("-")), None)  # past -v, --debug


def reexec_on_chosen_allocator() -> None:
    """When this process is a `lorakit train` command not yet on the chosen allocator, replace it with
    the same command on that allocator (same process id). A bad LORAKIT_MALLOC ends it with one line, exit 2."""
    argv = getattr(sys, "orig_argv", [])
    if launched_command(argv) not in COMMANDS or not sys.platform.startswith("linux"):
        return
    try:
        env = preload_env()
    except AllocatorError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if env.get("LD_PRELOAD", "") == os.environ.get("LD_PRELOAD", "") or in_use() != "system":
        return
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the OS (tcmalloc: ReleaseFreeMemory; glibc: malloc_trim), at a
    phase boundary such as loading another model after training; False where the allocator offers no call."""
    if not sys.platform.startswith("linux"):
        return False
    process = ctypes.CDLL(None)
    name = {"tcmalloc": "MallocExtension_ReleaseFreeMemory", "system": "malloc_trim"}.get(in_use())
    call = getattr(process, name, None) if name else None
    if call is None:
        return False
    call(*([0] if name == "malloc_trim" else []))
    return True
