"""Writing an export's files: refuse to overwrite unless forced, and never leave half a file.

Each file is written under a temporary name in the target folder, flushed to disk, and renamed
over the target at the end, so a crash, a full disk or Ctrl-C leaves the old file (or none),
never a truncated one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lorakit.export.errors import ExportError


def check_writable(path: Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Raise ExportError if `path` exists (without `force`), is a folder, is one of the `inputs` or a file in an input
    folder or in lorakit's cache (even with `force`: an export never writes over what it reads), or its folder is
    missing."""
    from lorakit.models import cache_root

    if path.expanduser().resolve().is_relative_to(cache_root().expanduser().resolve()):
        raise ExportError(f"{path}: lies in lorakit's cache ({cache_root()}), which exports read; write it elsewhere")
    for source in inputs:
        source = Path(source).expanduser()
        if path.exists() and (os.path.samefile(source, path) or (
                source.is_dir() and path.resolve().is_relative_to(source.resolve()))):
            raise ExportError(f"{path}: is {source} or one of its files, which this export reads; write it elsewhere")
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give a file name for the export (e.g. {path / 'model.gguf'})")
    if path.exists() and not force:
        raise ExportError(f"{path}: already exists; pass --force to overwrite it")
    if path.parent.exists() and not path.parent.is_dir():
        raise ExportError(f"{path.parent}: is a file, not a folder; give an output path in a folder")
    if not path.parent.is_dir():
        raise ExportError(f"{path.parent}: folder does not exist; create it first")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced and renamed onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise ExportError(f"{path}: could not be written ({reason}); nothing was left behind") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` and put its file at `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
