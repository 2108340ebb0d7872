"""The adapters a server holds: load one from inside the allowed root, unload one, list them.

The model is shared with the generation worker, so every change happens under `lock`, which the
worker holds while it runs the model (a whole batch, or one step of a continuous batch): an adapter
is never added or removed in the middle of a forward pass. An adapter that rows of a running batch
still use (`busy`, kept by the worker) is unloaded once they have finished; from the moment its
unload is asked, no new request may use it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint.peft_io import load_adapter
from lorakit.lora.adapters import delete_adapter, round_adapter

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(Exception):
    """A load or unload that cannot be done; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class AdapterRegistry:
    def __init__(self, model: nn.Module, base_name: str, root: str | Path | None = None,
                 lora_dtype: torch.dtype | None = None):
        """`lora_dtype`: every loaded adapter's factors rounded to that type's values (ServeConfig.lora_dtype)."""
        self.model, self.base_name, self.lora_dtype = model, base_name, lora_dtype
        self.root = Path(root).resolve() if root is not None else None
        self.paths: dict[str, str] = {}  # adapter name -> folder it came from
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified when `busy` or the adapters change
        self.busy: Counter[str] = Counter()  # adapter -> rows of the running batch using it
        self.leaving: set[str] = set()  # adapters being unloaded, waiting for their rows to finish
        self.version = 0  # bumped on every load and unload

    def names(self) -> list[str]:
        return list(self.paths)

    def add(self, name: str, directory: str | Path) -> None:
        """Load a startup adapter (any path the operator gave on the command line)."""
        self._check_name(name)
        with self.lock:
            self._load(name, directory)
            self.paths[name] = str(directory)
        log.info("adapter %s loaded from %s", name, directory)

    def load(self, name: str, path: str) -> Path:
        """Load adapter `name` from `path`, which must resolve inside the adapters root."""
        self._check_name(name)
        folder = self.resolve(path)
        with self.lock:
            while name in self.leaving:  # the same name, still being unloaded
                self.changed.wait()
            if name in self.paths:
                raise RegistryError(
                    409, f"adapter '{name}' is already loaded; DELETE /v1/adapters/{name} first", "name"
                )
            try:
                self._load(name, folder)
            except RegistryError:
                raise
            except Exception as err:  # the folder's files are the client's input: whatever they hold, a 400
                log.debug("adapter %s from %s refused", name, folder, exc_info=True)
                raise RegistryError(400, f"cannot load adapter '{name}': {err}", "path") from None
            self.paths[name] = str(folder)
        log.info("adapter %s loaded from %s", name, folder)
        return folder

    def _load(self, name: str, folder: str | Path) -> None:
        self.version += 1
        load_adapter(self.model, folder, name, lora_only=True)  # never a weight of the shared base
        if self.lora_dtype is not None:
            round_adapter(self.model, name, self.lora_dtype)

    def unload(self, name: str) -> None:
        """Unload adapter `name`: new requests for it are refused at once; it goes once no row uses it."""
        with self.lock:
            if name not in self.paths:
                raise RegistryError(404, f"adapter '{name}' is not loaded", "name")
            del self.paths[name]
            self.leaving.add(name)
            try:
                while self.busy[name] > 0:
                    self.changed.wait()
                delete_adapter(self.model, name)
                self.version += 1
            finally:
                self.leaving.discard(name)
                self.changed.notify_all()
        log.info("adapter %s unloaded", name)

    def set_busy(self, adapters: list[str | None]) -> None:
        """The worker's count of rows per adapter (call with `lock` held); wakes unloads waiting on it."""
        busy = Counter(a for a in adapters if a is not None)
        if busy != self.busy:
            self.busy = busy
            self.changed.notify_all()

    def resolve(self, path: str) -> Path:
        """The real folder `path` names (relative paths are taken from the root); refuse anything outside it."""
        if self.root is None:
            raise RegistryError(403, "loading adapters is off: start the server with --adapters-root DIR")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise RegistryError(400, "'path' must be a non-empty string", "path")
        folder = (self.root / path).resolve()  # resolves '..' and every symlink on the way
        if not folder.is_relative_to(self.root):
            raise RegistryError(400, f"path '{path}' is outside the adapters root", "path")
        if not folder.is_dir():
            raise RegistryError(
                400, f"path '{path}' is not an adapter folder under the adapters root (a path is taken from the "
                "root: 'ros2-demo/adapter' for ROOT/ros2-demo/adapter)", "path"
            )
        escaping = next((f.name for f in folder.iterdir() if not f.resolve().is_relative_to(self.root)), None)
        if escaping is not None:  # a file of the folder linked from elsewhere: read only what the root holds
            raise RegistryError(400, f"path '{path}': {escaping} links outside the adapters root", "path")
        return folder

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME.match(name) or name == self.base_name:
            raise RegistryError(
                400,
                f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                "not the base model's name",
                "name",
            )
