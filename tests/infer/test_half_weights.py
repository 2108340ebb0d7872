"""Half-type linear weights for decoding: what is cast, and outputs close to fp32 with every row's own adapter."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import TOY_TARGETS, perturb, toy_model_folder
from lorakit.infer import half_weights
from lorakit.train import half_base
from lorakit.infer.half_weights import use_half_weights
from lorakit.lora.base import HalfWeightLinear
from lorakit.lora.mixed import row_adapters
from lorakit.models import load_causal_lm

NAMES = ["a", "b"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    folder = toy_model_folder(root / "model")
    model = load_causal_lm(folder)
    for seed, name in enumerate(NAMES):
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
        lorakit.save_adapter(model, root / name, name)
    return folder, root


def loaded(toy, setting: str, cast=use_half_weights):
    """The toy model with its weights cast as `cast(model, setting)` does, then adapters "a" and "b" loaded."""
    folder, root = toy
    model = load_causal_lm(folder).eval()
    used = cast(model, setting)
    for name in NAMES:
        lorakit.load_adapter(model, root / name, name)
    return model, used


def mixed_logits(model, rows: list[str | None]) -> torch.Tensor:
    ids = torch.arange(3, 3 + 7 * len(rows)).reshape(len(rows), 7) % 40 + 3
    with torch.no_grad(), row_adapters(model, rows):
        return model(input_ids=ids).logits


def test_every_linear_but_the_head_is_cast(toy):
    model, used = loaded(toy, "bf16")
    assert used == "bf16"
    cast = [m for m in model.modules() if type(m) is HalfWeightLinear]
    assert cast and all(m.weight.dtype == torch.bfloat16 for m in cast)
    head = model.get_output_embeddings()
    assert getattr(head, "base_layer", head).weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_a_mixed_batch_on_half_weights_stays_close_to_fp32_with_each_rows_adapter(toy, half):
    rows = ["a", "b", None, "a"]
    fp32 = mixed_logits(loaded(toy, "off")[0], rows)
    halved = mixed_logits(loaded(toy, half)[0], rows)
    assert halved.dtype == torch.float32
    rounding = (halved - fp32).abs().max().item()
    with torch.no_grad():  # what the adapters add: the same rows through the base alone
        base = mixed_logits(loaded(toy, "off")[0], [None] * len(rows))
    adapter_effect = (fp32 - base)[[0, 1, 3]].abs().max().item()
    assert rounding <= 0.05 * fp32.abs().max().item()
    assert rounding < 0.1 * adapter_effect  # every row still gets its own adapter's term


def test_off_never_casts_and_auto_follows_the_probe(toy, monkeypatch):
    monkeypatch.setenv("LORAKIT_RETIME", "1")  # each probe below is asked, not the first one's answer
    assert loaded(toy, "off")[1] is None
    assert loaded(toy, "auto")[1] is None  # too small to time: fp32
    monkeypatch.setattr(half_base, "MIN_PROBED_WEIGHT", 0)
    seen = []
    monkeypatch.setattr(half_base, "probe_half_type", lambda i, o, rows: seen.append(rows) or (None, {}))
    model, used = loaded(toy, "auto")
    assert used is None and seen == [half_weights.DECODE_ROWS]
    assert not any(type(m) is HalfWeightLinear for m in model.modules())
    monkeypatch.setattr(half_base, "probe_half_type", lambda i, o, rows: ("bf16", {}))
    assert loaded(toy, "auto")[1] == "bf16"


def test_an_unknown_setting_is_refused(toy):
    with pytest.raises(ValueError, match="expected one of off, auto, fp16, bf16"):
        loaded(toy, "int4")
