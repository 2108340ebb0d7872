"""Folders and files a command writes whole (a merged model, a combined adapter, generated records): checked before
anything loads, written beside their place, then put there in one rename, so that a failure leaves what was there
and never loses an input.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorakit.atomic_files import umask
from lorakit.config import ConfigError
from lorakit.models import cache_root


def check_new_folder(output: str | Path, flag: str, inputs: list[str | Path], force: bool | None = None) -> Path:
    """`output` as a Path, or ConfigError naming `flag` where a new folder cannot take its place: an empty path, a
    file, the current folder or one holding it, an input or a folder holding one, lorakit's cache, a folder that
    holds files (unless `force`; None: the command has no --force), or a place that cannot be written."""
    if not str(output).strip():
        raise ConfigError(f"{flag}: empty; expected a folder for the output")
    path = Path(output).expanduser()
    where = path.resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; expected a new or empty folder")
    if Path.cwd().resolve().is_relative_to(where):
        raise ConfigError(f"{flag} {path}: is the current folder or holds it; name a new folder")
    for source in inputs:
        source = Path(source).expanduser()
        if source.exists() and source.resolve().is_relative_to(where):
            raise ConfigError(f"{flag} {path}: is or holds {source}, which this command reads; name a new folder")
    if where.is_relative_to(cache_root().resolve()):
        raise ConfigError(f"{flag} {path}: lies in lorakit's cache ({cache_root()}); name a folder of your own")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ConfigError(f"{flag} {path}: already holds files; name a new or empty folder"
                          + (", or add --force" if force is not None else ""))
    parent = where.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorakit-probe-", dir=parent))
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write in {parent} ({err.strerror})") from None
    return path


def check_new_file(output: str | Path, flag: str, inputs: list[str | Path | None], force: bool | None = None) -> Path:
    """`output` as a Path, or ConfigError naming `flag` where the command may not write that file: an empty path, a
    file it reads (even with `force`), a folder, a file already there (unless `force`; None: the command has no
    --force), or a folder that is missing, is a file or cannot be written."""
    if not str(output).strip():
        raise ConfigError(f"{flag}: empty; expected a file to write")
    path = Path(output).expanduser()
    for source in inputs:
        if source and Path(source).expanduser().exists() and path.exists() and os.path.samefile(source, path):
            raise ConfigError(f"{flag} {path}: is {source}, which this command reads; write to another file")
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; expected a file name")
    if path.exists() and not force:
        raise ConfigError(f"{flag} {path}: already exists; "
                          + ("pass --force to replace it" if force is not None else "name a new file"))
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {parent}")
    return path


def staging_folder(output: Path) -> Path:
    """A new, empty folder beside `output` (its parents made), readable as a folder made by hand would be."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    staging.chmod(0o777 & ~umask())  # mkdtemp's own 0o700 would hide a merged model from other users
    return staging


def move_into_place(staging: Path, output: Path) -> None:
    """Put the whole folder `staging` at `output`. An `output` already there is moved aside first and removed only
    once the new one is in place (and put back if that fails)."""
    aside = None
    if output.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-", dir=output.parent))
        os.rmdir(aside)
        os.rename(output, aside)
    try:
        os.rename(staging, output)
    except OSError:
        if aside is not None:
            os.rename(aside, output)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
