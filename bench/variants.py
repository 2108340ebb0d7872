"""LoRA variants side by side: LoRA, rsLoRA, DoRA and PiSSA on ROS 2 and SST-2, and DoRA's step time against LoRA's.

    python bench/variants.py [--steps 20] [--sst2-steps 40] [--timing-steps 5] [--tasks ros2 sst2]
                              [--dora-dropout full|lowrank]

Quality, step time and peak memory. Each variant trains in its own child process (so each peak
RSS is its own) through `lorakit train`'s code path (lorakit.run), from the shipped config, on the
same examples in the same order for the same steps; only lora.* differs:
    lora     the config as shipped (r=8, alpha 16, dropout 0.05)
    rslora   lora.use_rslora: scale alpha / sqrt(r)
    dora     lora.use_dora
    pissa    lora.init_lora_weights: pissa
  ros2   examples/ros2/config.yaml (SmolLM2-135M-Instruct; data from examples/ros2/make_data.py), --steps
         steps; scored on the valid split: its loss, and the exact match and valid-command rate of greedy
         generations. The test split is not read; nothing is chosen on valid (one checkpoint, the last).
  sst2   examples/sst2/config.yaml (MiniLM-L6), the first --sst2-steps x 16 training sentences after the
         seeded shuffle, --sst2-steps steps; accuracy and macro-F1 on GLUE dev, scored once.
Step time is the wall time between optimizer steps (a global optimizer hook), median over the steps
after the second; peak memory is the child's peak RSS up to its last step (model included).

DoRA's step time against LoRA's, side by side: one process holds a LoRA and a DoRA model, each at the
config's dropout and at dropout 0, and takes a step of each in turn on the same ROS 2 batches
(lorakit's training step: packed rows, fused paths); every round gives a DoRA / LoRA ratio. lorakit's
DoRA there uses --dora-dropout (lora.dora_dropout: full, PEFT's, by default; lowrank drops out only the
low-rank branch's input). PEFT 0.21 does the same with its own models (padded batches, the transformers
forward with labels), printed beside.
Writes runs/bench/variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import RssSampler, min_median, write_result

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora": [],
    "rslora": ["--lora.use_rslora", "true"],
    "dora": ["--lora.use_dora", "true"],
    "pissa": ["--lora.init_lora_weights", "pissa"],
}
CONFIGS = {"ros2": "examples/ros2/config.yaml", "sst2": "examples/sst2/config.yaml"}
ROS2_DATA = Path("runs/ros2-data")
WORK = Path("runs/bench/variants")


def task_overrides(task: str, variant: str, args) -> list[str]:
    out = str(WORK / f"{task}-{variant}")
    common = ["--train.logging_steps", "1", "--train.progress", "false", "--train.output_dir", out,
              "--train.overwrite_output_dir", "true"]  # each repeat trains anew
    if task == "ros2":
        steps = str(args.steps)
        limit = ["--data.max_eval_examples", str(args.valid_limit)] if args.valid_limit else []
        return common + limit + [
            "--train.max_steps", steps, "--data.test_file", "null", "--eval.compare_base", "false",
            "--eval.samples", "0", "--train.eval_strategy", "steps", "--train.eval_steps", steps,
            "--train.save_strategy", "steps", "--train.save_steps", steps,
        ]
    steps = str(args.sst2_steps)
    return common + [
        "--train.max_steps", steps, "--data.max_train_examples", str(16 * args.sst2_steps),
        "--train.eval_strategy", "no", "--train.save_strategy", "no",
    ]


def quality(args) -> dict:
    """Child: train one variant on one task with lorakit.run; its scores, step times and peak RSS."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from lorakit.config_loading import load_run_config
    from lorakit.run import run

    config = load_run_config(CONFIGS[args.task], VARIANTS[args.variant] + task_overrides(args.task, args.variant, args))
    sampler = RssSampler()
    stamps, peaks = [], []
    register_optimizer_step_post_hook(lambda *_: (stamps.append(time.perf_counter()), peaks.append(sampler.peak)))
    summary = run(config, echo=lambda *a, **k: None)
    sampler.stop()
    scores = {k: v for k, v in summary["final_score"]["scores"].items() if isinstance(v, float)}
    step_s = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # from the third step on
    return {"scores": scores, "steps": len(stamps), "step_s": statistics.median(step_s), "peak_rss_mb": peaks[-1]}


def speed(args) -> list[dict]:
    """Child: LoRA and DoRA models (at the config's dropout and at 0) of one framework take steps in turn."""
    import torch

    from lorakit.data.masking import tokenize_dataset
    from lorakit.models import load_tokenizer
    from lorakit.tasks.ros2 import make_split

    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    batch = 8
    examples, _ = tokenize_dataset(tokenizer, make_split("train", batch * (args.timing_steps + 1), seed=0), "seed", 128)
    groups = [examples[i * batch : (i + 1) * batch] for i in range(args.timing_steps + 1)]
    if args.framework == "peft":
        build, step = _peft_model, _peft_step
    else:
        build, step = (lambda dora, p: _lorakit_model(dora, p, args.dora_dropout)), _lorakit_step
    models = {(v, p): build(v == "dora", p) for p in (args.dropout, 0.0) for v in ("lora", "dora")}
    times = {key: [] for key in models}
    for group in groups:
        for key, (model, optimizer) in models.items():
            started = time.perf_counter()
            step(model, optimizer, group, tokenizer.pad_token_id)
            times[key].append(time.perf_counter() - started)
    rows = []
    dora_dropout = args.dora_dropout if args.framework == "lorakit" else "full"  # PEFT has only its own
    for p in (args.dropout, 0.0):
        for i, (lora_s, dora_s) in enumerate(zip(times[("lora", p)][1:], times[("dora", p)][1:]), start=1):
            rows.append({"part": "speed", "framework": args.framework, "dropout": p, "dora_dropout": dora_dropout,
                         "round": i, "lora_step_s": lora_s, "dora_step_s": dora_s, "dora_over_lora": dora_s / lora_s})
    return rows


def _lorakit_model(dora: bool, dropout: float, dora_dropout: str):
    import torch

    import lorakit
    from lorakit.models import load_causal_lm
    from lorakit.train.lean import use_fused_paths

    model = lorakit.inject(load_causal_lm(MODEL), lorakit.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, use_dora=dora, dora_dropout=dora_dropout))
    use_fused_paths(model)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)


def _lorakit_step(model, optimizer, group, pad_id: int) -> None:
    from lorakit.train.loop import accumulate_gradients
    from lorakit.train.objectives import CausalLMObjective

    objective = CausalLMObjective(pad_id, pack_length=256)  # the ROS 2 config's packing
    accumulate_gradients(model, [objective.collate(group)], objective)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _peft_model(dora: bool, dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.models import load_causal_lm

    model = get_peft_model(load_causal_lm(MODEL), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, use_dora=dora))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)


def _peft_step(model, optimizer, group, pad_id: int) -> None:
    from lorakit.data.collate import pad_batch

    model(**pad_batch(group, pad_id)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def child(*argv: str):
    """Run this file as a child with `argv` added; its RESULT line, parsed."""
    cmd = [sys.executable, __file__, *sys.argv[1:], *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}, check=False)
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summarise(runs: list[dict], dropout: float, dora_dropout: str) -> list[dict]:
    rows = []
    for framework in ("lorakit", "peft"):
        mode = f", dora_dropout {dora_dropout}" if framework == "lorakit" else ""
        for p in (dropout, 0.0):
            ratios = [r["dora_over_lora"] for r in runs if r.get("framework") == framework and r["dropout"] == p]
            if ratios:
                rows.append({"what": f"{framework}: DoRA / LoRA step time, dropout {p:g}{mode}", **min_median(ratios)})
    by = {(r["task"], r["variant"]): r for r in runs if r.get("part") == "quality"}
    for task in sorted({t for t, _ in by}):
        if (task, "dora") in by and (task, "lora") in by:
            ratio = by[(task, "dora")]["step_s"] / by[(task, "lora")]["step_s"]
            rows.append({"what": f"{task}: DoRA / LoRA median step time (separate processes)", **min_median([ratio])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="ROS 2 optimizer steps of every variant")
    parser.add_argument("--sst2-steps", type=int, default=40, help="SST-2 optimizer steps (batch 16)")
    parser.add_argument("--timing-steps", type=int, default=5, help="timed rounds of the side-by-side DoRA/LoRA steps")
    parser.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of the side-by-side timing (the configs')")
    parser.add_argument("--dora-dropout", choices=["full", "lowrank"], default="full",
                        help="lora.dora_dropout of lorakit's DoRA in the side-by-side timing (full: PEFT's)")
    parser.add_argument("--valid-limit", type=int, default=None,
                        help="score only the first N valid examples (default: the whole split; for a quick try)")
    parser.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--results-dir", default=None, help="where variants.json goes (default runs/bench)")
    parser.add_argument("--task", choices=list(CONFIGS), help=argparse.SUPPRESS)  # set in the children
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        print("RESULT " + json.dumps(quality(args)))
        return
    if args.framework:
        print("RESULT " + json.dumps(speed(args)))
        return
    if "ros2" in args.tasks and not (ROS2_DATA / "valid.jsonl").is_file():
        subprocess.run([sys.executable, "examples/ros2/make_data.py", str(ROS2_DATA)], check=True)

    runs = []
    for task in args.tasks:
        for variant in VARIANTS:
            result = child("--task", task, "--variant", variant)
            row = {"part": "quality", "task": task, "variant": variant, **result.pop("scores"), **result}
            runs.append(row)
            print(json.dumps(row), flush=True)
    print(f"side by side: lorakit's DoRA with dora_dropout {args.dora_dropout}", flush=True)
    for framework in ("lorakit", "peft"):
        for row in child("--framework", framework):
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = summarise(runs, args.dropout, args.dora_dropout)
    print(f"\n{'':<62} {'min':>7} {'median':>7} {'max':>7}")
    for row in summary:
        print(f"{row['what']:<62} {row['min']:>7.3f} {row['median']:>7.3f} {row['max']:>7.3f}")
    peak_self = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    path = write_result(
        "variants", "LoRA variants: LoRA, rsLoRA, DoRA, PiSSA", runs,
        description=(f"ROS 2 ({args.steps} steps, scored on valid) and SST-2 ({args.sst2_steps} steps, GLUE dev), "
                     "each variant in its own process through lorakit's training run, same data, order and steps; "
                     f"then DoRA against LoRA side by side ({args.timing_steps} rounds, lorakit with dora_dropout "
                     f"{args.dora_dropout} and PEFT), at dropout {args.dropout:g} and 0."),
        columns=[("task", "task"), ("variant", "variant"), ("eval_loss", "valid loss"),
                 ("eval_exact_match", "valid exact match"), ("eval_valid_rate", "valid command rate"),
                 ("test_accuracy", "dev accuracy"), ("test_macro_f1", "dev macro-F1"), ("step_s", "step s"),
                 ("peak_rss_mb", "peak RSS MB"), ("framework", "side by side"), ("dropout", "dropout"),
                 ("dora_dropout", "dora_dropout"),
                 ("round", "round"), ("lora_step_s", "LoRA step s"), ("dora_step_s", "DoRA step s"),
                 ("dora_over_lora", "DoRA / LoRA")],
        summary=summary, out_dir=args.results_dir,
        notes=[f"largest child peak RSS: {peak_self:.0f} MB"],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
