"""`manifest.json`: the size and SHA-256 of every file of a checkpoint folder, written last.

A checkpoint is only trusted when its manifest is there and every file it lists has the listed
size and hash, so a folder damaged after the fact (a truncated copy, a flipped bit, a file lost)
is told apart from a good one before resume loads anything from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Flush every file of `folder` to disk, then write the manifest of their sizes and hashes."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())  # the bytes we hash are the bytes on disk before the rename
        files[path.name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    target = folder / MANIFEST_NAME
    with open(target, "w", encoding="utf-8") as fh:
        json.dump({"version": 1, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return target


def manifest_problem(folder: Path) -> str | None:
    """Why `folder` cannot be trusted (one phrase), or None when its manifest checks out."""
    target = folder / MANIFEST_NAME
    if not target.is_file():
        return f"{MANIFEST_NAME} is missing"
    try:
        files = json.loads(target.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        files = None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return f"{MANIFEST_NAME} is not readable JSON with a 'files' mapping"
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, expected {expected.get('size')}"
        if file_digest(path) != expected.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST_NAME}"
    return None


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
