"""Training throughput and memory: PEFT + Trainer (seed recipe, dynamic padding) against lorakit.

    python bench/train_throughput.py [--model smollm2-135m-instruct] [--steps 8] [--warmup 2] [--batch 8]
                                     [--curve-steps 50]

Each variant runs in its own child process (so each peak RSS is its own), on the same model, the
same ROS 2 examples in the same order, r=8 on all seven projections, the same batch and steps:
  a  PEFT + transformers Trainer, the first seed's recipe: padding="max_length" (256) and labels
     masked by comparing ids with the pad id
  b  PEFT + Trainer with dynamic padding (pad to the longest of each batch), prompt masked
  c  lorakit: packed rows, head on labelled positions only, fused LoRA/SwiGLU, grouped attention
  d  lorakit's memory mode: as c, but rows packed to 128 tokens (the longest example's length) and
     each its own forward (train.max_tokens_per_forward = 128): the same loss and gradient, a quarter
     of the activations held at once; less memory, a little less speed
Steps after warm-up are timed; "real tokens" are non-pad tokens. b and c run --curve-steps steps
from the same initial adapter (b writes it, c loads it), the same data order and the same linear
schedule, and their per-step losses are compared. The machine's fp32 GEMM rate is
measured here too, and c is reported as a fraction of the ceiling it implies (model FLOPs per
token / GEMM rate). Prints a table and the ratios; writes runs/bench/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

VARIANTS = {
    "a": "PEFT + Trainer, seed recipe (max_length 256)",
    "b": "PEFT + Trainer, dynamic padding",
    "c": "lorakit",
    "d": "lorakit, memory mode (128-token rows, one per forward)",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED_MAX_LENGTH = 256
PACK_LENGTH = 256
MEMORY_PACK_LENGTH = 128  # = the examples' max_length: every example still fits a row


def examples(tokenizer, n: int) -> list[dict]:
    """ROS 2 records tokenised the lorakit way (prompt masked, EOS kept): the common input of all variants."""
    from lorakit.data.masking import tokenize_dataset
    from lorakit.tasks.ros2 import make_split

    out, _ = tokenize_dataset(tokenizer, make_split("train", n, seed=0), "seed", 128)
    return out


def run_peft(args, recipe: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class InOrderTrainer(Trainer):  # the examples in the given order, as lorakit's variant takes them
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    from lorakit.data.collate import pad_batch
    from lorakit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    steps = _steps(args, recipe == "dynamic")
    data = examples(tokenizer, args.batch * steps)
    if recipe == "seed":  # the first seed: pad every example to 256, then mask labels by the pad id
        rows = []
        for e in data:
            ids = e["input_ids"] + [tokenizer.pad_token_id] * (SEED_MAX_LENGTH - len(e["input_ids"]))
            labels = [-100 if t == tokenizer.pad_token_id else t for t in ids]
            rows.append({"input_ids": ids, "labels": labels, "attention_mask": [int(i < len(e["input_ids"])) for i in range(len(ids))]})
        data = rows
    real = []

    def collate(batch):
        out = pad_batch(batch, tokenizer.pad_token_id)
        real.append(int(out["attention_mask"].sum()))
        return out

    model = get_peft_model(load_causal_lm(args.model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.save_pretrained(_init_dir(args))  # the starting adapter c will load, so both curves start alike
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    training = TrainingArguments(
        output_dir=str(Path(args.out).parent / f"peft-{recipe}"), per_device_train_batch_size=args.batch,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    trainer = InOrderTrainer(model=model, args=training, train_dataset=data, data_collator=collate, callbacks=[Clock()])
    sampler = RssSampler()
    trainer.train()
    rss = sampler.stop()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return _result(stamps, real, args, losses, rss)


def run_lorakit(args, memory_mode: bool = False) -> dict:
    import lorakit
    from lorakit.models import load_causal_lm, load_tokenizer
    from lorakit.config import TrainConfig
    from lorakit.train.lean import release_freed_memory, use_fused_paths
    from lorakit.train.loop import accumulate_gradients, real_tokens
    from lorakit.train.objectives import CausalLMObjective
    from lorakit.train.optim import build_optimizer, build_scheduler

    tokenizer = load_tokenizer(args.model)
    steps = _steps(args, True)
    data = examples(tokenizer, args.batch * steps)
    model = load_causal_lm(args.model)
    lorakit.load_adapter(model, _init_dir(args))  # PEFT's initial adapter (variant b wrote it)
    model.train()
    pack_length = MEMORY_PACK_LENGTH if memory_mode else PACK_LENGTH
    objective = CausalLMObjective(tokenizer.pad_token_id, pack_length=pack_length)
    config = TrainConfig(
        lr=2e-4, scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0,
        max_tokens_per_forward=pack_length if memory_mode else 0,
    )
    use_fused_paths(model, config.fused)  # what train() switches on, as it does
    if config.release_memory:
        release_freed_memory()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    stamps, real, losses = [], [], []
    sampler = RssSampler()
    for step in range(steps):
        batch = objective.collate(data[step * args.batch : (step + 1) * args.batch])
        real.append(real_tokens(batch))
        losses.append(accumulate_gradients(model, [batch], objective, max_tokens=config.max_tokens_per_forward))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    rss = sampler.stop()
    return _result(stamps, real, args, losses, rss)


def _steps(args, with_curve: bool) -> int:
    return max(args.steps + args.warmup, args.curve_steps if with_curve else 0)


def _init_dir(args) -> str:
    return str(Path(args.out).parent / "initial-adapter")


class RssSampler:
    """The largest resident set seen while training, sampled every 20 ms from /proc (Linux)."""

    def __init__(self):
        self.peak = self.start = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"rss_before_training_mb": self.start, "training_peak_rss_mb": self.peak}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _result(stamps: list[float], real: list[int], args, losses: list[float], rss: dict) -> dict:
    """Throughput over every step after warm-up (the collate call of step i logs real[i])."""
    seconds = stamps[-1] - stamps[args.warmup - 1]
    tokens = sum(real[args.warmup : len(stamps)])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "real_tokens_per_s": tokens / seconds, "seconds": seconds, "real_tokens": tokens, "peak_rss_mb": peak_mb,
        **rss, "steps": len(stamps), "losses": losses,
    }


def gemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_token(model_name: str) -> float:
    """A LoRA step's cost per token: forward, backward through activations, LoRA weight grads: ~4 x 2 x params."""
    from lorakit.models import load_causal_lm

    params = sum(p.numel() for p in load_causal_lm(model_name).parameters())
    return 4 * 2 * params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--curve-steps", type=int, default=50, help="steps of b and c whose losses are compared")
    parser.add_argument("--out", default="runs/bench/train_throughput.json")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # set in the children
    args = parser.parse_args()
    if args.variant:
        torch.manual_seed(0)
        result = {
            "a": lambda: run_peft(args, "seed"), "b": lambda: run_peft(args, "dynamic"),
            "c": lambda: run_lorakit(args), "d": lambda: run_lorakit(args, memory_mode=True),
        }[args.variant]()
        print("RESULT " + json.dumps(result))
        return

    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(line[len("RESULT "):])
    gemm = gemm_gflops()
    ceiling = gemm * 1e9 / flops_per_token(args.model)
    print(f"{'variant':<56} {'real tok/s':>10} {'peak RSS MB':>12} {'training peak RSS MB':>21}")
    for key, row in rows.items():
        print(f"{key}  {VARIANTS[key]:<53} {row['real_tokens_per_s']:>10.1f} {row['peak_rss_mb']:>12.0f} {row['training_peak_rss_mb']:>21.0f}")
    summary = {"gemm_gflops": gemm, "ceiling_tokens_per_s": ceiling}
    for ours in "cd":
        speed, peak = rows[ours]["real_tokens_per_s"], rows[ours]["peak_rss_mb"]
        summary[f"{ours}_over_a"] = speed / rows["a"]["real_tokens_per_s"]
        summary[f"{ours}_over_b"] = speed / rows["b"]["real_tokens_per_s"]
        summary[f"memory_{ours}_over_b"] = peak / rows["b"]["peak_rss_mb"]
        summary[f"{ours}_fraction_of_ceiling"] = speed / ceiling
        curve_b, curve = rows["b"]["losses"], rows[ours]["losses"]
        n = min(len(curve_b), len(curve), args.curve_steps)
        summary[f"{ours}_curve_steps"] = n
        summary[f"{ours}_curve_max_relative_gap"] = max(abs(c - b) / abs(b) for b, c in zip(curve_b[:n], curve[:n]))
    for key, value in summary.items():
        print(f"{key:<24} {value:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, **summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
