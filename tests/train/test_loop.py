"""The loop's pieces on tiny models: label-only loss, accumulation, schedule, learning and stopping."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import allocator
from lorakit.config import TrainConfig
from lorakit.data.collate import pad_batch
from lorakit.data.masking import tokenize_dataset
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.train.loop import accumulate_gradients, train
from lorakit.train.loss import causal_lm_loss_sum, label_token_count
from lorakit.train.objectives import CausalLMObjective
from lorakit.train.optim import lr_factor
from conftest import TINY_MODELS, TOY_TARGETS, TOY_TASK, toy_model_folder


def _batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 9:] = -100  # a shorter response, then padding
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk_rows", [256, 3])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_head_on_labelled_positions_only_gives_the_full_loss(arch, chunk_rows, monkeypatch):
    monkeypatch.setattr("lorakit.train.loss.CHUNK_ROWS", chunk_rows)  # 3: several chunks, the last one short
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(r=2, init_lora_weights=False))
    batch = _batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    ours = causal_lm_loss_sum(model, batch)
    assert torch.allclose(ours, full, atol=1e-5)
    grads_full = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    grads_ours = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    assert max((a - b).abs().max().item() for a, b in zip(grads_full, grads_ours)) <= 1e-5


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=2, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    examples = []
    for n_prompt, n_response in [(3, 2), (6, 7), (2, 9), (5, 1)]:  # uneven label counts
        ids = torch.randint(3, 128, (n_prompt + n_response,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:], "attention_mask": [1] * len(ids)})
    params = [p for p in model.parameters() if p.requires_grad]

    accumulate_gradients(model, [pad_batch(examples, 0)], CausalLMObjective(0))
    big = [p.grad.clone() for p in params]
    model.zero_grad()
    accumulate_gradients(model, [pad_batch(examples[:2], 0), pad_batch(examples[2:], 0)], CausalLMObjective(0))
    assert max((a - p.grad).abs().max().item() for a, p in zip(big, params)) <= 1e-5
    assert label_token_count(pad_batch(examples, 0)["labels"]) == 2 + 7 + 9 + 1
    model.zero_grad()
    accumulate_gradients(model, [pad_batch(examples, 0)], CausalLMObjective(0), max_tokens=20)  # rows of 13: 1 a piece
    assert max((a - p.grad).abs().max().item() for a, p in zip(big, params)) <= 1e-5  # every response token; the shift only drops position 0


def test_schedule_warms_up_then_decays():
    total, warm = 100, 10
    cosine = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert cosine[0] == pytest.approx(1 / 11) and cosine[0] < cosine[5] < cosine[9] < 1.0  # no step at rate 0
    assert cosine[warm] == pytest.approx(1.0) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine[warm:], cosine[warm + 1 :]))
    assert lr_factor(55, total, warm, "linear") == pytest.approx(0.5)
    assert lr_factor(99, total, warm, "constant") == 1.0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("total, ratio, warm",
                         [(30, 0.03, 1), (7, 0.1, 1), (10, 0.25, 2), (375, 0.05, 18), (20, 0.0, 0)])
def test_the_schedule_after_the_warm_up_is_transformers_one(kind, total, ratio, warm):
    """Past its warm-up the rate each step takes equals transformers' get_scheduler with the same warm-up steps; a
    ratio above 0 warms up at least one step (0.03 of 30 steps rounded down to none)."""
    from transformers import get_scheduler

    from lorakit.train.optim import build_scheduler

    rates = []
    for make in (lambda o: build_scheduler(o, TrainConfig(lr=1.0, warmup_ratio=ratio, scheduler=kind), total),
                 lambda o: get_scheduler(kind, o, num_warmup_steps=warm, num_training_steps=total)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, taken = make(optimizer), []
        for _ in range(total):
            taken.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        rates.append(taken)
    ours, theirs = rates
    assert ours[warm:] == pytest.approx(theirs[warm:], abs=1e-12)
    assert ours[:warm] == pytest.approx([(k + 1) / (warm + 1) for k in range(warm)])  # from above 0, never at 0


def test_a_toy_task_is_learned_and_generation_stops_at_eos(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    examples, _ = tokenize_dataset(tokenizer, TOY_TASK, "seed", max_length=64)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=TOY_TARGETS))
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), max_steps=120, batch_size=4, lr=1e-2, warmup_ratio=0.05,
        eval_strategy="no", save_strategy="no", progress=False, logging_steps=20,
    )
    result = train(model, examples, examples, config, CausalLMObjective(tokenizer.pad_token_id))
    losses = [e["loss"] for e in result.history if e["kind"] == "train"]
    assert losses[-1] < 0.1 * losses[0]

    prompts = [f"### Instruction:\n{r['instruction']}\n\n### Command:\n" for r in TOY_TASK]
    outputs = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=20))
    assert outputs == [r["output"] for r in TOY_TASK]
    # It stopped by itself: the generated ids end in EOS well before the 20-token budget.
    enc = tokenizer(prompts[0], return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:]
    assert ids[-1].item() == tokenizer.eos_token_id and len(ids) < 20
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_time_budget_stops_then_evaluates_and_saves(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    examples, _ = tokenize_dataset(tokenizer, TOY_TASK, "seed", max_length=64)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TOY_TARGETS))
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), max_steps=100_000, max_minutes=0.02, batch_size=4,  # a 1.2 s budget
        eval_strategy="steps", eval_steps=50_000, save_strategy="steps", save_steps=50_000, progress=False,
    )
    result = train(model, examples, examples, config, CausalLMObjective(tokenizer.pad_token_id))
    assert 0 < result.steps < 100_000 and result.seconds < 30
    assert "eval_loss" in result.final_eval  # the stopping step was evaluated...
    assert int(result.best_checkpoint.rsplit("-", 1)[1]) == result.steps  # ...and saved, so keep-best sees it
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


QUANTISED_THEN_PREPARED = """
import torch
from torch import nn
from lorakit import allocator
from lorakit.config import QuantizationConfig, TrainConfig
from lorakit.quant.model import quantize_model
from lorakit.train.loop import _prepare_model
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(48)])  # 192 MB of fp32 weights
quantize_model(model, QuantizationConfig(bits=4, type="nf4"))  # 24 MB of them stay, as NF4
before = resident()
_prepare_model(model, TrainConfig())
print(allocator.in_use(), before - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.library("auto") is None,
                    reason="needs Linux and tcmalloc (make setup installs it)")
def test_what_quantising_freed_goes_back_to_the_os_before_training():
    """On the allocator `lorakit train` runs on, the fp32 weights a QLoRA base was quantised from stayed resident
    until training ended; preparing the model for training hands them back."""
    env = allocator.preload_env({"PATH": os.environ.get("PATH", ""), allocator.ENV: "tcmalloc"})
    out = subprocess.run([sys.executable, "-c", QUANTISED_THEN_PREPARED], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, returned = out.stdout.split()
    assert name == "tcmalloc"
    assert int(returned) >= 150 << 20
