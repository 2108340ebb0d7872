"""Importing lorakit bounds oneDNN's per-shape caches: bf16 GEMMs over many row counts stop growing the process."""

import json
import os
import subprocess
import sys

import pytest

from lorakit.onednn_caches import CAPACITY_VARIABLES

GROWTH_SCRIPT = r"""
import json, sys
if sys.argv[1] == "lorakit":
    import lorakit  # noqa: F401
import torch

def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024

up, down = torch.randn(1536, 576).bfloat16(), torch.randn(576, 1536).bfloat16()
torch.nn.functional.linear(torch.randn(8, 576).bfloat16(), up)
start = rss_mb()
for rows in range(300, 600):  # a new shape every time, as a training step's token count changes
    torch.nn.functional.linear(torch.nn.functional.linear(torch.randn(rows, 576).bfloat16(), up), down)
print(json.dumps(rss_mb() - start))
"""


def growth_mb(mode: str, env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT, mode], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_importing_lorakit_keeps_bf16_gemms_over_new_shapes_from_growing_the_process():
    plain_env = {k: v for k, v in os.environ.items() if k not in CAPACITY_VARIABLES}
    unbounded = growth_mb("torch", plain_env)
    if unbounded < 150:
        pytest.skip(f"this CPU's bf16 GEMMs grew the process by only {unbounded:.0f} MB without the bound")
    bounded = growth_mb("lorakit", plain_env)
    assert bounded < 0.4 * unbounded, (bounded, unbounded)


def test_a_capacity_the_user_set_is_kept():
    env = {**os.environ, "LRU_CACHE_CAPACITY": "7"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    done = subprocess.run(
        [sys.executable, "-c", "import os, lorakit; print(os.environ['LRU_CACHE_CAPACITY'], "
                               "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
        env=env, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["7", "32"]


def test_decoding_widens_the_caches_but_never_a_capacity_the_user_set():
    env = {**os.environ, "LRU_CACHE_CAPACITY": "7"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    code = ("import os; from lorakit.onednn_caches import widen_onednn_caches; "
            "print(widen_onednn_caches(192), os.environ['LRU_CACHE_CAPACITY'], "
            "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], widen_onednn_caches(100))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.split() == ["True", "7", "192", "False"]
