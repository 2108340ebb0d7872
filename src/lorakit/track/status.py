"""status.json: what a run last said about itself (running, finished, interrupted, failed).

Rank 0 writes it atomically: `running` with its process id, host, process start time and memory
allocator (lorakit/allocator.py) when the run starts; `finished`, `interrupted` or `failed` (with
the error line) when it ends. A run killed outright (SIGKILL, out of memory, power loss) leaves
`running` behind: `process_alive` lets a reader on the same host tell that its process is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lorakit.allocator import in_use as allocator_in_use
from lorakit.atomic_files import write_atomically

STATUS_FILE = "status.json"
STATES = ("running", "finished", "interrupted", "failed")


def write_status(run_dir: str | Path, state: str, **fields) -> None:
    """Replace `<run_dir>/status.json` in one rename (a reader never sees half of it)."""
    assert state in STATES, state
    path = Path(run_dir) / STATUS_FILE
    now = time.time()
    started = now if state == "running" else (read_status(run_dir) or {}).get("started", now)
    record = {"state": state, **_this_process(), "started": started, **fields}
    if state != "running":
        record["ended"] = now
    write_atomically(path, json.dumps(record, indent=1) + "\n")


def read_status(run_dir: str | Path) -> dict | None:
    """The record, or None when there is none or it cannot be read."""
    try:
        record = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


def process_alive(record: dict) -> bool | None:
    """Whether the process that wrote `record` still runs: None when it ran on another host."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or not 0 < pid < 2**22:  # Linux's pids stay below 2**22
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    return started is None or record.get("process_start") in (None, started)  # a reused pid starts later


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
            "allocator": allocator_in_use()}


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None  # field 22 of stat; fields[0] is field 3
