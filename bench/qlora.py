"""LoRA against QLoRA (NF4, NF4 + double quantisation, 8-bit) on the embedded SmolLM2-135M-Instruct.

    python bench/qlora.py [--steps 100] [--variants lora,nf4,nf4-dq,int8] [--eval-examples 200]
    python bench/qlora.py --smoke          # 3 steps, batch 2, 16 eval examples: checks the plumbing only

Each variant is one `lorakit train examples/ros2/config.yaml` process (so each peak RSS is its own),
the same ROS 2 data, adapter (r=8 on all seven projections), learning rate and schedule, for the
same number of steps; only the base and what QLoRA brings with it differ:
  lora    fp32 base, adamw, no checkpointing (the ROS 2 config as it is)
  nf4     NF4 base without double quantisation   } gradient checkpointing and paged_adamw_8bit,
  nf4-dq  NF4 base with double quantisation      } as the fourth seed's QLoRA recipe;
  int8    LLM.int8 base                          } fp32 compute on CPU, bf16 on CUDA
Reported per variant: peak RSS, the quantised linear weights' bytes and their ratio to fp32, the
whole base's ratio (the tied embedding/head stays fp32), training tokens/s (after the first
logging window), and the eval loss after the last step, with its ratio to LoRA's.
Targets: linear-weight ratio <= 0.15 for NF4, eval loss within 10% of LoRA's.
Writes runs/bench/qlora.json (bench/results.py's shape).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import write_result

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "ros2" / "config.yaml"
QLORA = ["--train.gradient_checkpointing", "true", "--train.optimizer", "paged_adamw_8bit"]
VARIANTS = {
    "lora": [],
    "nf4": ["--quantization.bits", "4", "--quantization.double_quant", "false", *QLORA],
    "nf4-dq": ["--quantization.bits", "4", "--quantization.double_quant", "true", *QLORA],
    "int8": ["--quantization.bits", "8", *QLORA],
}


def ensure_data(folder: Path) -> None:
    if not (folder / "valid.jsonl").is_file():  # make_data.py writes train, valid and test
        subprocess.run([sys.executable, str(ROOT / "examples" / "ros2" / "make_data.py"), str(folder)], check=True)


def run_variant(name: str, args, out: Path) -> dict:
    """Train one variant in a child process; return its measurements."""
    overrides = [
        "--train.output_dir", str(out / name), "--train.overwrite_output_dir", "true",  # each repeat trains anew
        "--train.max_steps", str(args.steps), "--train.progress", "false",
        "--train.eval_strategy", "steps", "--train.eval_steps", str(args.steps), "--train.save_strategy", '"no"',  # quoted: YAML reads a bare no as false
        "--train.logging_steps", str(max(1, args.steps // 10)), "--train.batch_size", str(args.batch),
        "--eval.task", "null", "--data.max_eval_examples", str(args.eval_examples),
        "--data.train_file", str(args.data / "train.jsonl"), "--data.eval_file", str(args.data / "valid.jsonl"),
        "--data.test_file", "null",  # variants are compared on the eval split after the same steps
    ]
    command = [sys.executable, "-m", "lorakit", "train", str(CONFIG), *overrides, *VARIANTS[name]]
    started = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed (exit {proc.returncode}): {' '.join(command)}")
    summary = json.loads((out / name / "summary.json").read_text())
    events = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [e["tokens_per_s"] for e in events if e["kind"] == "train"]
    return {
        "variant": name,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "tokens_per_s": statistics.median(speeds[1:] or speeds),
        "eval_loss": summary["eval"]["eval_loss"],
        "weight_bytes": summary.get("weight_bytes"),
        "wall_s": time.time() - started,
    }


def report(rows: list[dict]) -> list[str]:
    quantised = next((r["weight_bytes"] for r in rows if r["weight_bytes"]), None)
    lora = next((r for r in rows if r["variant"] == "lora"), None)
    lines = [
        f"{'variant':8} {'peak RSS MiB':>12} {'linear MiB':>10} {'linear x':>8} {'model x':>8} "
        f"{'tok/s':>7} {'eval loss':>9} {'loss / LoRA':>11}"
    ]
    for r in rows:
        wb = r["weight_bytes"]
        if wb:
            linear, lin_x, model_x = wb["linear_bytes"], wb["linear_ratio"], wb["model_ratio"]
        else:  # the fp32 base: the same layers in fp32
            linear, lin_x, model_x = (quantised["linear_fp32_bytes"] if quantised else 0), 1.0, 1.0
        vs = f"{r['eval_loss'] / lora['eval_loss']:.3f}" if lora else "-"
        lines.append(
            f"{r['variant']:8} {r['peak_rss_mib']:12.0f} {linear / 2**20:10.1f} {lin_x:8.3f} {model_x:8.3f} "
            f"{r['tokens_per_s']:7.0f} {r['eval_loss']:9.4f} {vs:>11}"
        )
    for r in rows:
        if r["variant"].startswith("nf4") and r["weight_bytes"]:
            ok = r["weight_bytes"]["linear_ratio"] <= 0.15
            lines.append(f"{r['variant']}: linear weights {r['weight_bytes']['linear_ratio']:.3f}x fp32 (<= 0.15: {ok})")
        if lora and r["variant"] != "lora":
            ok = r["eval_loss"] <= 1.10 * lora["eval_loss"]
            lines.append(f"{r['variant']}: eval loss within 10% of LoRA's: {ok}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per variant")
    parser.add_argument("--batch", type=int, default=8, help="packed rows per step (the ROS 2 config's 8)")
    parser.add_argument("--eval-examples", type=int, default=200, help="valid examples for the eval loss")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "ros2-data", help="ROS 2 data folder")
    parser.add_argument("--smoke", action="store_true", help="3 steps, batch 2, 16 eval examples")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.eval_examples = 3, 2, 16
    ensure_data(args.data)
    out = ROOT / "runs" / "bench" / "qlora"
    rows = [run_variant(name, args, out) for name in args.variants.split(",")]
    lines = report(rows)
    print("\n".join(lines))
    path = write_result(
        "qlora", "LoRA against QLoRA: memory, weight bytes, speed, eval loss", [_flat(r, rows) for r in rows],
        description=(f"examples/ros2/config.yaml for {args.steps} steps of {args.batch} packed rows per variant, "
                     f"eval loss on {args.eval_examples} valid examples after the last step. Variants run one "
                     "after another, each in its own process (so each peak RSS is its own)."),
        columns=[("variant", "variant"), ("peak_rss_mib", "peak RSS MiB"), ("linear_mib", "linear MiB"),
                 ("linear_ratio", "linear x fp32"), ("model_ratio", "model x fp32"), ("tokens_per_s", "tok/s"),
                 ("eval_loss", "eval loss"), ("loss_vs_lora", "loss / LoRA"), ("wall_s", "wall s")],
        notes=[line for line in lines if ":" in line and not line.startswith("variant")],
    )
    print(f"wrote {path}")


def _flat(row: dict, rows: list[dict]) -> dict:
    """One run as the table shows it (weight bytes of the fp32 base: the quantised layers' fp32 size)."""
    quantised = next((r["weight_bytes"] for r in rows if r["weight_bytes"]), None)
    lora = next((r for r in rows if r["variant"] == "lora"), None)
    wb = row["weight_bytes"]
    linear = wb["linear_bytes"] if wb else (quantised["linear_fp32_bytes"] if quantised else None)
    return {
        "variant": row["variant"], "peak_rss_mib": row["peak_rss_mib"],
        "linear_mib": linear / 2**20 if linear is not None else None,
        "linear_ratio": wb["linear_ratio"] if wb else 1.0, "model_ratio": wb["model_ratio"] if wb else 1.0,
        "tokens_per_s": row["tokens_per_s"], "eval_loss": row["eval_loss"],
        "loss_vs_lora": row["eval_loss"] / lora["eval_loss"] if lora else None, "wall_s": row["wall_s"],
    }


if __name__ == "__main__":
    main()
