"""`lorakit train` on tcmalloc: which command line re-executes, what LD_PRELOAD it gets, and real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lorakit import allocator
from lorakit.track.status import read_status
from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc/self/maps are Linux's")
TCMALLOC = allocator.library("auto") if sys.platform.startswith("linux") else None
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="tcmalloc is not installed (make setup installs it)")


@pytest.mark.parametrize(("argv", "command"), [
    (["/venv/bin/python", "/venv/bin/lorakit", "train", "c.yaml"], "train"),
    (["/venv/bin/python", "/venv/bin/lorakit", "-v", "train", "c.yaml"], "train"),
    (["python", "-u", "-m", "lorakit", "--debug", "train", "c.yaml"], "train"),
    (["python", "-m", "lorakit", "serve", "--model", "m"], "serve"),
    (["python", "-m", "pytest", "-q"], None),
    (["python", "script.py", "lorakit", "train"], None),
    (["python", "-m", "lorakit"], None),
])
def test_the_command_is_read_from_the_interpreters_command_line(argv, command):
    assert allocator.launched_command(argv) == command


@linux
@needs_tcmalloc
def test_auto_puts_tcmalloc_first_in_ld_preload_once():
    env = allocator.preload_env({"LD_PRELOAD": "libother.so"})
    assert env["LD_PRELOAD"].split() == [TCMALLOC, "libother.so"]
    assert allocator.preload_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # already there: not twice


def test_system_leaves_the_environment_alone():
    env = {allocator.ENV: "system", "LD_PRELOAD": "libother.so"}
    assert allocator.preload_env(env) == env


@linux
@pytest.mark.parametrize("setting", ["bogus", "/no/such/libmalloc.so"])
def test_an_unknown_allocator_is_one_line_and_exit_2_before_anything_runs(setting, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(tmp_path / "config.yaml")],
                          env={**os.environ, allocator.ENV: setting}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lorakit: error: LORAKIT_MALLOC={setting}: expected one of auto, system, tcmalloc, jemalloc or the path "
        "of an allocator's shared library"]


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("allocator")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK))
    config = {"model": str(toy_model_folder(root / "model")),
              "lora": {"r": 4, "lora_alpha": 8, "target_modules": TOY_TARGETS},
              "data": {"train_file": str(root / "train.jsonl"), "max_length": 64},
              "train": {"max_steps": 2, "batch_size": 2, "progress": False}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


@linux
@needs_tcmalloc
@pytest.mark.parametrize(("setting", "expected"), [(None, "tcmalloc"), ("system", "system")])
def test_lorakit_train_runs_on_the_allocator_chosen(setting, expected, toy_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "LD_PRELOAD")}
    env.update({} if setting is None else {allocator.ENV: setting})
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(toy_config),
                           "--train.output_dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_status(tmp_path / "run")["allocator"] == expected  # what /proc/self/maps showed in the run


RELEASE = """
import sys
from lorakit import allocator
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
block = bytearray(256 << 20)  # touched page by page
block = None
before = resident()
print(allocator.in_use(), allocator.release_free_memory(), before - resident())
"""


@linux
@needs_tcmalloc
def test_free_memory_kept_by_tcmalloc_goes_back_to_the_os_when_released():
    env = allocator.preload_env({"PATH": os.environ.get("PATH", ""), allocator.ENV: "tcmalloc"})
    out = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=120)
    name, released, returned = out.stdout.split()
    assert (name, released) == ("tcmalloc", "True"), out.stderr[-2000:]
    assert int(returned) >= 200 << 20  # the freed 256 MB block had stayed resident until the call
