"""Finding run folders under a root and reading their files, never outside the root, never failing on
a half-written file: a run in progress, a crashed run or a stray folder reads as what it has."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import yaml

RUN_MARKERS = ("run_config.yaml", "metrics.jsonl", "status.json", "summary.json")
MAX_DEPTH = 3  # runs/NAME, runs/GROUP/NAME, runs/GROUP/SUB/NAME
SKIP_FOLDERS = {"checkpoints", "adapter", "tensorboard", "mlruns", "wandb", "__pycache__"}
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster
MAX_EVENT_BYTES = 8 << 20  # of metrics.jsonl per answer


def find_runs(root: Path) -> dict[str, Path]:
    """{name: folder} of every run folder under `root`: a folder holding one of RUN_MARKERS.

    Names are paths relative to root with '/' ('sweep/lr-1e-3'). A folder (or symlink) that
    resolves outside root is left out; so are hidden folders and a run's own subfolders.
    """
    root = root.resolve()
    found: dict[str, Path] = {}

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIP_FOLDERS or not _utf8(entry.name) or not entry.is_dir():
                continue
            path = Path(entry.path)
            if not inside(root, path):
                continue
            if any((path / marker).is_file() for marker in RUN_MARKERS):
                found[path.relative_to(root).as_posix()] = path
            elif depth < MAX_DEPTH:
                walk(path, depth + 1)

    walk(root, 1)
    return found


def _utf8(name: str) -> bool:
    """Whether a folder's name is text a page can show (not bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, lies within `root` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def contained_file(root: Path, run_dir: Path, relative: str) -> Path | None:
    """`run_dir/relative` if it is a regular file inside root (no '..', no absolute path, no symlink out)."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or any(p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    path = run_dir / relative
    return path if inside(root.resolve(), path) and path.is_file() else None


def read_text(path: Path, limit: int = 50_000_000) -> str | None:
    try:
        with path.open("rb") as fh:
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def read_json(path: Path) -> dict | None:
    """A JSON object file, NaN and infinities as null (a diverged run logs them; JSON answers cannot hold them)."""
    text = read_text(path)
    try:
        value = json.loads(text, parse_constant=_no_number) if text else None
    except (ValueError, RecursionError):  # RecursionError: nested past what json reads
        return None
    return plain_json(value) if isinstance(value, dict) else None


def read_yaml(path: Path) -> dict | None:
    text = read_text(path)
    try:
        value = yaml.load(text, Loader=YAML_LOADER) if text else None
    except (yaml.YAMLError, RecursionError):
        return None
    return plain_json(value) if isinstance(value, dict) else None


def _no_number(_constant: str) -> None:
    """json's NaN, Infinity and -Infinity read as null."""


def plain_json(value, depth: int = 0):
    """`value` as a JSON answer can hold it, through lists and dicts: a NaN or infinite float (`1e999` too) and
    anything nested past MAX_DEPTH (a YAML anchor that holds itself) as None, a lone surrogate as U+FFFD, keys and
    other types (dates, bytes) as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {plain_json(str(key)): plain_json(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(item, depth + 1) for item in value]
    return plain_json(str(value))


MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


HEAD_BYTES = 256  # the first bytes of metrics.jsonl that tell a file written afresh in place from the same file grown


def first_bytes(path: Path, count: int = HEAD_BYTES) -> bytes:
    with path.open("rb") as fh:
        return fh.read(count)


def head_digest(path: Path, length: int) -> str:
    """A digest of the file's first min(HEAD_BYTES, length) bytes ("" where it cannot be read), for the page."""
    try:
        return hashlib.blake2b(first_bytes(path, min(HEAD_BYTES, length)), digest_size=8).hexdigest()
    except OSError:
        return ""


def read_events(path: Path, offset: int = 0, whole: bool = False) -> tuple[list[dict], int]:
    """metrics.jsonl from byte `offset`: (the complete events, the offset after the last complete line).

    A line still being written (no newline yet) or one that does not parse is not returned; the
    next read starts at it again or past it. At most MAX_EVENT_BYTES are read, unless `whole`: a long
    file comes over the page's next polls. NaN and infinities read as null.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(-1 if whole else MAX_EVENT_BYTES)
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    if not end and not whole and len(data) == MAX_EVENT_BYTES:  # one line longer than a read: passed over
        end = len(data)
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line, parse_constant=_no_number)
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict) and isinstance(event.get("step"), int):
            events.append(plain_json(event))
    return events, offset + end
