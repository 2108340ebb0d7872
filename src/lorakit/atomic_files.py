"""Text files a reader never sees half of: written beside their place, then renamed onto it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's file-mode mask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, text: str) -> None:
    """`text` to `path` through a temporary file beside it: a crash leaves the old file or the new one, whole."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's own 0o600 would hide the file from a reader of another user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
