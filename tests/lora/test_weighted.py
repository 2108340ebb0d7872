"""Adapters combined into one: every combination_type equals PEFT 0.21's add_weighted_adapter on the same inputs."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit
from conftest import TINY_MODELS, logits_of, perturb
from lorakit.lora.adapters import lora_layers
from lorakit.lora import weighted
from lorakit.lora.weighted import COMBINATIONS

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj"]}
CASES = [  # (combination_type, majority_sign_method)
    ("cat", "total"), ("linear", "total"), ("svd", "total"),
    ("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"), ("dare_ties", "total"),
    ("dare_ties", "frequency"), ("magnitude_prune", "total"), ("ties_svd", "frequency"),
    ("dare_linear_svd", "total"), ("dare_ties_svd", "total"), ("magnitude_prune_svd", "total"),
]


def _pair(arch: str, tmp_path):
    """The same two random adapters 'a' and 'b' in PEFT and in lorakit (loaded from PEFT's files)."""
    peft_model = get_peft_model(
        TINY_MODELS[arch](), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False),
        adapter_name="a",
    )
    peft_model.add_adapter("b", PeftLoraConfig(r=4, lora_alpha=12, target_modules=TARGETS[arch], init_lora_weights=False))
    model = TINY_MODELS[arch]()
    for name in ("a", "b"):
        peft_model.save_pretrained(tmp_path, selected_adapters=[name])
        lorakit.load_adapter(model, tmp_path / name, name)  # PEFT writes a named adapter in its own folder
    return peft_model, model


def _record_masks(monkeypatch) -> list[torch.Tensor]:
    """torch.bernoulli's outputs (DARE's masks) from here on."""
    drawn, real = [], torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda input, *a, **k: drawn.append(real(input, *a, **k)) or drawn[-1])
    return drawn


def _replay_masks(monkeypatch, masks: list[torch.Tensor]):
    """torch.bernoulli hands out `masks` in order, checking each is drawn for a tensor of its shape."""
    queue = iter(masks)

    def replay(input, *args, **kwargs):
        mask = next(queue)
        assert mask.shape == input.shape
        return mask

    monkeypatch.setattr(torch, "bernoulli", replay)
    return queue


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("method, sign", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_each_combination_equals_peft_on_the_merged_deltas(arch, method, sign, tmp_path, monkeypatch):
    peft_model, model = _pair(arch, tmp_path)
    options = dict(density=0.5, majority_sign_method=sign)
    drawn = _record_masks(monkeypatch)
    peft_model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "m", combination_type=method, **options)
    assert bool(drawn) == method.startswith("dare")
    left = _replay_masks(monkeypatch, drawn)  # the same random masks: PEFT's, in PEFT's order
    lorakit.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "m", method, **options)
    assert next(left, None) is None

    for name, layer in lora_layers(model):
        theirs = peft_model.base_model.model.get_submodule(name).get_delta_weight("m")
        theirs = theirs if layer.kind == "linear" else theirs.T  # PEFT's stored layout -> (out, in)
        ours = layer.adapters["m"].delta_weight()
        assert ours.abs().max() > 1e-3, name
        assert (ours - theirs).abs().max().item() <= TOL, (name, (ours - theirs).abs().max().item())


@pytest.mark.parametrize("svd_rank, svd_clamp", [(2, None), (6, 0.9)])
def test_svd_rank_and_clamp_as_peft(svd_rank, svd_clamp, tmp_path):
    peft_model, model = _pair("llama", tmp_path)
    options = dict(svd_rank=svd_rank, svd_clamp=svd_clamp)
    peft_model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "m", combination_type="svd", **options)
    config = lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "m", "svd", **options)
    assert config.r == svd_rank
    for name, layer in lora_layers(model):
        theirs = peft_model.base_model.model.get_submodule(name).get_delta_weight("m")
        theirs = theirs if layer.kind == "linear" else theirs.T
        assert (layer.adapters["m"].delta_weight() - theirs).abs().max().item() <= TOL, name


def test_dare_is_reproducible_with_a_seeded_generator(input_ids):
    model = TINY_MODELS["llama"]()
    for seed, name in enumerate("ab"):
        lorakit.inject(model, lorakit.LoraConfig(r=4), name)
        perturb(model, name, seed=seed)
    for new in ("x", "y"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], new, "dare_ties", density=0.3,
                                     generator=torch.Generator().manual_seed(3))
    layers = lora_layers(model)
    assert all(torch.equal(layer.adapters["x"].A, layer.adapters["y"].A) for _, layer in layers)
    lorakit.set_adapter(model, "x")
    x = logits_of(model, input_ids)
    lorakit.set_adapter(model, "y")
    assert torch.equal(logits_of(model, input_ids), x)


def test_bad_options_are_named_together():
    model = TINY_MODELS["llama"]()
    lorakit.inject(model, lorakit.LoraConfig(r=4), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2), "b")
    with pytest.raises(lorakit.ConfigError, match="density: given None; 'ties' needs the share of entries kept, in "
                       r"\(0, 1\]; combination_type 'ties' combines A's and B's entry by entry, so the adapters need one rank"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "m", "ties")
    with pytest.raises(lorakit.ConfigError, match="combination_type: given 'mean', expected one of cat, linear"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "m", "mean")
    with pytest.raises(lorakit.ConfigError, match="weights: 1 given for 2 adapters"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [0.5], "m", "svd")
    assert set(model.lora_configs) == {"a", "b"}


def test_dora_adapters_are_refused_by_weighted_merges():
    model = TINY_MODELS["llama"]()
    lorakit.inject(model, lorakit.LoraConfig(r=4, use_dora=True), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4), "b")
    with pytest.raises(lorakit.ConfigError, match="adapter 'a' on .* is a DoraAdapter, whose update is more than s B A"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "m", "svd")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_whose_init_moved_part_of_w_are_refused_live(init, tmp_path, input_ids):
    model = TINY_MODELS["llama"]()
    lorakit.inject(model, lorakit.LoraConfig(r=4, init_lora_weights=init), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4), "b")
    with pytest.raises(lorakit.ConfigError, match=f"adapters 'a' \\({init}\\) hold part of W, which their init moved"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", "cat")
    lorakit.save_adapter(model, tmp_path / "a", "a")  # saved: relative to the original base, so it combines
    fresh = TINY_MODELS["llama"]()
    lorakit.load_adapter(fresh, tmp_path / "a", "a")
    lorakit.set_adapter(model, "a")
    expected = logits_of(model, input_ids)
    lorakit.add_weighted_adapter(fresh, ["a"], [1.0], "m", "cat")
    assert (logits_of(fresh, input_ids) - expected).abs().max() <= 1e-4


def test_every_method_is_documented():
    assert all(name in weighted.__doc__ for name in COMBINATIONS)
