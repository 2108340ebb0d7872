"""Checkpoint folders: the manifest, skipping damaged ones, interrupted saves, pruning, grad-scaler state."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

import lorakit
from lorakit.checkpoint.manifest import MANIFEST_NAME, manifest_problem
from lorakit.checkpoint.resume import (
    checkpoint_dir,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from conftest import TINY_MODELS, perturb


def _parts():
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=2))
    perturb(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _save(run, step, parts, **kwargs):
    model, optimizer, scheduler = parts
    return save_checkpoint(run, step, model, "default", optimizer, scheduler, {"best_metric": None}, **kwargs)


def test_every_file_is_in_the_manifest_and_a_changed_byte_is_caught(tmp_path):
    path = _save(tmp_path, 10, _parts())
    files = json.loads((path / MANIFEST_NAME).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name != MANIFEST_NAME)
    assert manifest_problem(path) is None
    target = path / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    assert manifest_problem(path) == f"optimizer.pt does not match its SHA-256 in {MANIFEST_NAME}"


@pytest.mark.parametrize("manifest", ['{"version": 1, "files": []}', '{"files": {"optimizer.pt": 5}}', "[1]", "null"])
def test_a_manifest_of_the_wrong_shape_marks_the_checkpoint_damaged(tmp_path, manifest):
    path = _save(tmp_path, 10, _parts())
    (path / MANIFEST_NAME).write_text(manifest)
    assert manifest_problem(path) == f"{MANIFEST_NAME} is not readable JSON with a 'files' mapping"
    assert latest_good_checkpoint(tmp_path) is None


def test_resume_skips_damaged_checkpoints_with_a_warning_naming_them(tmp_path, caplog):
    parts = _parts()
    good, truncated, unlisted = (_save(tmp_path, s, parts) for s in (10, 20, 30))
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (unlisted / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING):
        assert latest_good_checkpoint(tmp_path) == good
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"skipping damaged checkpoint {unlisted} ({MANIFEST_NAME} is missing); using {good}" in w for w in warnings)
    assert any(f"{truncated} (adapter_model.safetensors has 100 bytes, expected" in w for w in warnings)


def test_an_interrupted_save_leaves_no_temporary_folder_and_the_old_checkpoint_intact(tmp_path):
    parts = _parts()
    first = _save(tmp_path, 10, parts)

    class Interrupting(torch.optim.lr_scheduler.LambdaLR):
        def state_dict(self):  # called mid-save, after the adapter files are written
            raise KeyboardInterrupt

    model, optimizer, _ = parts
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 20, (model, optimizer, Interrupting(optimizer, lambda s: 1.0)))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert latest_good_checkpoint(tmp_path) == first


def test_a_temporary_folder_left_by_a_killed_save_is_never_listed_and_is_removed(tmp_path):
    first = _save(tmp_path, 10, _parts())
    stale = first.with_name(".tmp-step-000020-12345")
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path) == [first]
    assert latest_good_checkpoint(tmp_path) == first and not stale.exists()


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    parts = _parts()
    _save(tmp_path, 10, parts)
    path = _save(tmp_path, 10, parts)
    assert manifest_problem(path) is None and len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_pruning_keeps_the_best_and_the_latest(tmp_path):
    parts = _parts()
    paths = [_save(tmp_path, s, parts) for s in (10, 20, 30, 40)]
    prune_checkpoints(tmp_path, 2, {paths[0], paths[-1]})
    assert list_checkpoints(tmp_path) == [paths[0], paths[-1]]
    prune_checkpoints(tmp_path, 1, {paths[0], paths[-1]})  # a limit below the protected count deletes neither
    assert list_checkpoints(tmp_path) == [paths[0], paths[-1]]


def test_load_restores_optimizer_scheduler_scaler_and_every_rng(tmp_path):
    model, optimizer, scheduler = parts = _parts()
    loss = sum((p**2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(new_scale=77.0)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _save(tmp_path, 10, parts, scaler=scaler)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh_model, fresh_opt, fresh_sched = _parts()
    fresh_scaler = torch.amp.GradScaler("cpu")
    state = load_checkpoint(checkpoint_dir(tmp_path, 10), fresh_model, "default", fresh_opt, fresh_sched, fresh_scaler)
    assert state["step"] == 10 and fresh_sched.last_epoch == 1 and fresh_scaler.get_scale() == 77.0
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    a, b = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    live = dict(model.named_parameters())
    assert all(torch.equal(p, live[n]) for n, p in fresh_model.named_parameters() if p.requires_grad)
