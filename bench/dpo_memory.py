"""Peak memory of DPO against SFT on the same batch, on the embedded SmolLM2-135M-Instruct.

    python bench/dpo_memory.py [--pairs 16] [--steps 5] [--repeats 2]

The same B ROS 2 pairs (prompt, the reference command as chosen, another record's command as
rejected) make every step's batch: SFT trains on their 2B sequences as instruction records (batch
2B), DPO on the B pairs (2B rows per forward, plus the reference's). Same adapter (r=8 on all seven
projections), learning rate and steps; each variant is one `lorakit train` process, so each peak
RSS is its own, and the variants run interleaved, `--repeats` rounds:
  sft              causal LM on the 2B sequences
  dpo              the reference is the base with the adapter switched off (one model in memory)
  dpo-precomputed  the reference's log-probs computed once before the first step
Target: DPO's peak RSS <= 1.2x SFT's (a second model copy as the reference would add the base's
weights again: printed as a note). Writes runs/bench/dpo_memory.json (bench/results.py's shape).
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
VARIANTS = ("sft", "dpo", "dpo-precomputed")


def make_data(folder: Path, pairs: int) -> tuple[Path, Path]:
    """(the pairs file, the same sequences as instruction records), from the ROS 2 train split."""
    if not (folder / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "examples" / "ros2" / "make_data.py"), str(folder)], check=True)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()[:pairs]]
    prefs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": rows[(i + 1) % len(rows)]["output"]}
             for i, r in enumerate(rows)]
    sft = [{"instruction": p["prompt"], "output": p[side]} for side in ("chosen", "rejected") for p in prefs]
    out = folder / "bench"
    out.mkdir(exist_ok=True)
    (out / "dpo_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    (out / "dpo_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return out / "dpo_pairs.jsonl", out / "dpo_sft.jsonl"


def run_variant(name: str, args, files: tuple[Path, Path], out: Path) -> dict:
    """Train one variant in a child process; return its peak RSS and time."""
    pairs, sft = files
    data = sft if name == "sft" else pairs
    overrides = [
        "--task", "causal_lm" if name == "sft" else "dpo",
        "--data.train_file", str(data), "--data.eval_file", str(data), "--data.test_file", "null",
        "--data.packing", "false", "--data.max_length", "128",
        "--train.output_dir", str(out / name), "--train.overwrite_output_dir", "true",  # each repeat trains anew
        "--train.max_steps", str(args.steps), "--train.progress", "false",
        "--train.batch_size", str(2 * args.pairs if name == "sft" else args.pairs),
        "--train.eval_strategy", "no", "--train.save_strategy", '"no"', "--train.logging_steps", "1",
        "--train.precompute_reference", str(name == "dpo-precomputed").lower(), "--eval.task", "null",
    ]
    command = [sys.executable, "-m", "lorakit", "train", str(ROOT / "examples" / "ros2" / "config.yaml"), *overrides]
    started = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    if status != 0:
        raise SystemExit(f"{name}: lorakit train exited with status {status}")
    return {"variant": name, "peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="pairs per batch (SFT: twice as many sequences)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all variants")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "ros2-data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "dpo_memory")
    args = parser.parse_args()
    files = make_data(args.data, args.pairs)
    runs = []
    for repeat in range(1, args.repeats + 1):
        for name in VARIANTS:
            row = {"repeat": repeat, **run_variant(name, args, files, args.out)}
            runs.append(row)
            print(f"round {repeat} {name:16} peak RSS {row['peak_rss_mib']:7.0f} MiB  {row['seconds']:5.1f} s", flush=True)
    summary = []
    for name in VARIANTS[1:]:
        ratios = [d["peak_rss_mib"] / s["peak_rss_mib"] for s, d in zip(
            [r for r in runs if r["variant"] == "sft"], [r for r in runs if r["variant"] == name])]
        summary.append({"what": f"{name} / sft peak RSS", "min": min(ratios), "median": statistics.median(ratios)})
        print(f"{name} / sft peak RSS: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}")
    base_mib = 134.5e6 * 4 / 2**20  # SmolLM2-135M's fp32 weights: what a second model as the reference adds
    write_result(
        "dpo_memory", "DPO peak memory against SFT",
        description=(f"The same {args.pairs} ROS 2 pairs every step: SFT on their {2 * args.pairs} sequences, DPO on "
                     f"the pairs with the reference as the base with the adapter off, or precomputed; "
                     f"{args.steps} steps, each variant its own process, interleaved rounds."),
        runs=runs, summary=summary,
        columns=[("variant", "variant"), ("peak_rss_mib", "peak RSS MiB"), ("seconds", "s")],
        notes=[f"A second fp32 copy of the base as the reference would add about {base_mib:.0f} MiB."],
    )


if __name__ == "__main__":
    main()
