"""Training checkpoints: a PEFT adapter plus what it takes to continue the same run.

    <run>/checkpoints/step-000120/
        adapter_model.safetensors, adapter_config.json    the adapter, loadable by PEFT
        optimizer.pt       optimizer and scheduler state (tensors and numbers; read with weights_only)
        rng.safetensors    torch (and CUDA) generator states
        trainer_state.json step, best metric, python/numpy RNG, the resolved run config
        manifest.json      size and SHA-256 of each file above, written last

A checkpoint is written into a hidden temporary folder (`.tmp-step-000120-<pid>`) and renamed
into place when complete, so a crash mid-save never leaves a half checkpoint under a real name;
an interrupted save removes its temporary folder, and one left by a killed process is removed
on resume. Resume takes the newest checkpoint whose manifest checks out and names, in a warning,
each newer one it skips.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.checkpoint.manifest import fsync_dir, manifest_problem, write_manifest
from lorakit.checkpoint.peft_io import restore_adapter_weights, save_adapter

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-step-"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()  # step-NNNNNN only: a copy named step-000002-backup is not one of ours
             if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    scaler=None,
) -> Path:
    """Write checkpoint `step` atomically (manifest last, then one rename) and return its folder."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, step, model, adapter_name, optimizer, scheduler, state, scaler)
        write_manifest(tmp)
        if final.exists():  # the same step saved again after a resume: swap, never delete first
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:  # an error or Ctrl-C mid-save: leave no temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return final


def _write_files(tmp: Path, step, model, adapter_name, optimizer, scheduler, state, scaler) -> None:
    save_adapter(model, tmp, adapter_name)
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        blob["scaler"] = scaler.state_dict()
    torch.save(blob, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    full_state = {
        **state,
        "step": step,
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / STATE_NAME).write_text(json.dumps(full_state, indent=1), encoding="utf-8")


def latest_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose manifest checks out; each newer, damaged one is named in a warning."""
    remove_stale_temps(run_dir)
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = manifest_problem(path)
        if problem is None:
            for bad, why in skipped:
                log.warning("skipping damaged checkpoint %s (%s); using %s", bad, why, path)
            return path
        skipped.append((path, problem))
    for bad, why in skipped:
        log.warning("skipping damaged checkpoint %s (%s); no good one is left", bad, why)
    return None


def remove_stale_temps(run_dir: str | Path) -> None:
    """Delete temporary folders a killed save left behind (they are never read)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith((TEMP_PREFIX, ".old-" + PREFIX)):
                log.info("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, adapter_name: str, optimizer, scheduler, scaler=None
) -> dict:
    """Restore adapter, optimizer, scheduler, grad scaler and every RNG from `path`; return its state."""
    restore_adapter_weights(model, adapter_name, path)
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and "scaler" in blob:
        scaler.load_state_dict(blob["scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    random.setstate(_tuples(state["python_rng"]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return state


def prune_checkpoints(run_dir: str | Path, keep: int | None, protect: set[Path]) -> None:
    """Delete the oldest checkpoints beyond `keep`, never one in `protect` (the best, the latest)."""
    if keep is None:
        return
    checkpoints = list_checkpoints(run_dir)
    excess = len(checkpoints) - max(keep, len(protect & set(checkpoints)))
    for path in checkpoints:
        if excess <= 0:
            break
        if path not in protect:
            shutil.rmtree(path)
            excess -= 1


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
