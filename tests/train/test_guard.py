"""The divergence guard on a tiny model: a NaN or a spike is rolled back, the LR lowered, the run recovers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.config import TrainConfig
from lorakit.data.masking import tokenize_dataset
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.train.guard import DivergenceError, DivergenceGuard
from lorakit.train.loop import train
from lorakit.train.objectives import CausalLMObjective
from conftest import TOY_TARGETS, TOY_TASK, toy_model_folder


class FaultyObjective(CausalLMObjective):
    """Test-only fault injection: the training loss of chosen optimizer steps (counted as they are
    computed, so a replayed step counts again) is multiplied by `factor` (NaN by default)."""

    def __init__(self, pad_token_id: int, bad_calls: set[int], factor: float = math.nan):
        super().__init__(pad_token_id)
        self.bad_calls, self.factor, self.calls = bad_calls, factor, 0

    def loss_sum(self, model, batch):
        loss = super().loss_sum(model, batch)
        if not model.training:  # evaluation is never poisoned
            return loss
        self.calls += 1
        return loss * self.factor if self.calls in self.bad_calls else loss


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = toy_model_folder(tmp_path_factory.mktemp("guard") / "model")
    tokenizer = load_tokenizer(folder)
    # Each instruction has two answers ("red red", "red red red"), so the loss settles on a floor
    # above zero (about ln 2 on the ambiguous token) and a relative comparison of eval losses means something.
    words = TOY_TASK[:4]
    longer = [{**r, "output": f"{r['output']} {r['output'].split()[0]}"} for r in words]
    examples, _ = tokenize_dataset(tokenizer, words + longer, "seed", max_length=64)
    return folder, tokenizer, examples


def _train(toy, tmp_path, name, bad_calls=frozenset(), factor=math.nan, **overrides):
    folder, tokenizer, examples = toy
    model = load_causal_lm(folder)
    torch.manual_seed(0)  # the same LoRA initialisation in every run of this process
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS))
    settings = dict(
        output_dir=str(tmp_path / name), max_steps=20, batch_size=8, lr=1e-2, eval_strategy="steps", eval_steps=20,
        save_strategy="steps", save_steps=5, save_total_limit=2, progress=False, logging_steps=1,
        rollback_lr_factor=0.1, rollback_lr_steps=5, max_rollbacks=2,
    )
    config = TrainConfig(**{**settings, **overrides})
    objective = FaultyObjective(tokenizer.pad_token_id, set(bad_calls), factor)
    return model, train(model, examples, examples, config, objective)


def _events(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


@pytest.mark.slow
def test_a_nan_rolls_back_lowers_the_lr_recovers_and_finishes(toy, tmp_path):
    steps = dict(max_steps=50, eval_steps=50)  # long enough for both runs to settle on the loss floor
    _, reference_run = _train(toy, tmp_path, "clean", **steps)
    _, faulty = _train(toy, tmp_path, "faulty", bad_calls={12}, **steps)  # step 12's loss is NaN

    run = tmp_path / "faulty"
    [rollback] = _events(run, "rollback")
    assert rollback["step"] == 12 and rollback["to_step"] == 10 and rollback["reason"] == "loss is nan"
    assert rollback["until_step"] == 15 and _events(run, "recovered")[0]["step"] == 16
    logged = [(e["step"], e["lr"]) for e in _events(run, "train")]  # each the rate its step took
    assert [s for s, _ in logged] == [*range(1, 12), *range(11, 51)]  # step 11 ran twice
    clean = {e["step"]: e["lr"] for e in _events(tmp_path / "clean", "train")}
    first, replay = dict(logged[:11]), dict(logged[11:])
    assert first[11] == pytest.approx(clean[11])  # before the fault
    assert replay[11] == pytest.approx(0.1 * clean[11]) and replay[15] == pytest.approx(0.1 * clean[15])
    assert replay[16] == pytest.approx(clean[16]) and replay[30] == pytest.approx(clean[30])  # restored

    loss, reference = faulty.final_eval["eval_loss"], reference_run.final_eval["eval_loss"]
    assert math.isfinite(loss) and abs(loss - reference) <= 0.05 * reference, (loss, reference)
    assert faulty.steps == 50 and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_spike_beyond_its_factor_is_rolled_back(toy, tmp_path):
    _, result = _train(toy, tmp_path, "spike", bad_calls={15}, factor=50.0, spike_factor=5.0, spike_window=5)
    [rollback] = _events(tmp_path / "spike", "rollback")
    assert rollback["step"] == 15 and rollback["to_step"] == 10 and "above 5 x its recent average" in rollback["reason"]
    assert math.isfinite(result.final_eval["eval_loss"])


def test_repeated_divergence_stops_with_the_last_good_adapter_intact(toy, tmp_path):
    with pytest.raises(DivergenceError, match=r"training diverged at step 11 \(loss is nan\) after 2 rollbacks in a row"):
        _train(toy, tmp_path, "stuck", bad_calls={13, 14, 15})  # step 13, then each replay of step 11
    run = tmp_path / "stuck"
    assert [(e["step"], e["to_step"]) for e in _events(run, "rollback")] == [(13, 10), (11, 10)] and _events(run, "stopped")
    kept = load_file(run / "adapter" / "adapter_model.safetensors")
    good = load_file(run / "checkpoints" / "step-000010" / "adapter_model.safetensors")
    assert kept.keys() == good.keys() and all(torch.equal(kept[k], good[k]) for k in kept)


def test_without_a_checkpoint_it_rolls_back_to_the_start_in_memory(toy, tmp_path):
    _, result = _train(toy, tmp_path, "nosave", bad_calls={3}, save_strategy="no", max_steps=12, eval_steps=12)
    [rollback] = _events(tmp_path / "nosave", "rollback")
    assert rollback["to_step"] == 0 and not (tmp_path / "nosave" / "checkpoints").exists()
    assert math.isfinite(result.final_eval["eval_loss"])


def test_guard_state_round_trips_and_off_means_off():
    config = TrainConfig(spike_factor=3.0, spike_window=2, guard=True)
    guard = DivergenceGuard(config)
    assert guard.problem(1.0, math.inf) == "gradient norm is inf"
    for loss in (1.0, 2.0):
        guard.accept(1, loss)
    assert guard.problem(4.6, 1.0) == "loss 4.6 is above 3 x its recent average 1.5"
    assert guard.problem(4.4, 1.0) is None
    copy = DivergenceGuard(config)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert copy.state_dict() == guard.state_dict()
    assert DivergenceGuard(TrainConfig(guard=False)).problem(math.nan, math.nan) is None
