"""Training throughput, memory and MFU: PEFT + Trainer (seed recipe, dynamic padding) against lorakit.

    python bench/train_throughput.py [--model smollm2-135m-instruct] [--steps 20] [--warmup 2] [--batch 8]
                                     [--repeats 2]
    python bench/train_throughput.py --model-config qwen2.5-1.5b [--qlora] [--steps 10] [--variants bce]
    python bench/train_throughput.py --half --variants h --profile 3     # where the default's step time goes

--model-config NAME builds NAME's shape (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b: the first seed's
Qwen2.5-Coder-1.5B, same shape) from its published config with random weights (seeded; nothing is downloaded),
saved once as a bf16 checkpoint, as the published weights are, which every child loads as `lorakit train`
loads one (in fp32; e's QLoRA base in bf16, each linear quantised from its fp32 copy), so cost and memory
can be compared across sizes; the examples are still
tokenised by --model's tokenizer (its ids are valid in every listed vocabulary). --qlora adds
  e  lorakit QLoRA: as c on an NF4 base (double quantisation, bitsandbytes), fp32 compute
and --half adds
  h  lorakit's default, train.half_base auto: as c, the frozen bases in fp16 or bf16 where this CPU
     multiplies them faster than fp32 (AMX), else fp32; its MFU is over the peak of the type it chose
and --allocator adds
  p  b on the allocator `lorakit train` runs on (tcmalloc where installed): how much of lorakit's
     memory and speed an allocator alone would give PEFT
--variants picks which of the variants below run (ratios are printed where both sides ran). --profile N runs N
more steps of each lorakit variant under torch.profiler after its timed ones and notes its step's time by kind
of work (frozen, head and LoRA GEMMs, attention, casts, elementwise, optimizer, the rest; bench/step_profile.py).

Every variant runs in its own child process (so each peak RSS is its own; what loading freed is handed back to
the OS before the steps, as `lorakit train` does): lorakit's on the allocator
`lorakit train` runs on (lorakit/allocator.py), PEFT's on the system's malloc (p aside), on the same model, the
same ROS 2 examples in the same order, the same initial adapter (r=8 on all seven projections),
the same batch, learning rate, linear schedule and number of steps:
  a  PEFT + transformers Trainer, the first seed's recipe: padding="max_length" (256) and labels
     masked by comparing ids with the pad id (so the prompt is trained on too)
  b  PEFT + Trainer with dynamic padding (pad to the longest of each batch), prompt masked
  c  lorakit in fp32 (train.half_base off): packed rows, head on labelled positions only, fused
     LoRA/SwiGLU, grouped attention
  d  lorakit's memory mode: as c, but rows packed to 128 tokens (the longest example's length) and
     each its own forward (train.max_tokens_per_forward = 128): the same loss and gradient, a quarter
     of the activations held at once
The variants take turns within each of --repeats rounds (a b c d, a b c d, ...), so a drift of the
machine's speed hits them alike. Steps after --warmup are timed. "Real tokens" are non-pad tokens.

MFU = useful FLOPs per second / the machine's fp32 GEMM peak (h's: the peak of its half type). Useful FLOPs are counted once from
the examples, the same for every variant (lorakit.train.flops: 4 x frozen matmul params and 6 x
LoRA params per real token, causal attention over each example's own tokens, the head at labelled
positions only); what a variant does beyond that (pad tokens, logits nobody needs) is its own cost.
The peak is measured at the model's own matrix shapes (each linear layer's forward and input-gradient
product, at the batch's mean real-token count) before every round, fp32's as the faster of torch.mm
(MKL) and oneDNN's linear op at each shape (lorakit's fused paths multiply fp32 through whichever is
faster here), a half type's with torch.mm (oneDNN's kernels); the highest rate seen is the peak (a half
type slower than fp32 at the largest shape is timed there only: auto never
chooses it). The per-step losses of c and d are compared with b's (same start, data,
schedule). Also printed: the GEMM-bound MFU, the MFU of a step that did only its useful work with
its frozen-weight and head GEMMs at the rates measured at their own shapes (LoRA and attention at
the peak): the ceiling no implementation on these GEMM kernels passes. Peak memory is the child's peak RSS,
loading the model included (a bf16 checkpoint loaded in fp32 is widened tensor by tensor, never held beside
its whole fp32 copy: lorakit.models.load_causal_lm); the training peak is the largest RSS sampled during the
steps. Prints every run, then
min / median; writes runs/bench/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from model_shapes import MODEL_CONFIGS
from results import gemm_rates, half_rates, machine, min_median, write_result
from step_profile import profile_notes
from train_variants import prepare, run_lorakit, run_peft

from lorakit import allocator
from lorakit.train.half_base import HALF_TYPES

VARIANTS = {
    "a": "PEFT + Trainer, seed recipe (max_length 256)",
    "b": "PEFT + Trainer, dynamic padding",
    "c": "lorakit, fp32 base (train.half_base off)",
    "d": "lorakit, memory mode (128-token rows, one per forward)",
}
QLORA_VARIANT = {"e": "lorakit QLoRA (NF4 base, double quantisation)"}
HALF_VARIANT = {"h": "lorakit default (train.half_base auto)"}
ALLOCATOR_VARIANT = {"p": "PEFT + Trainer, dynamic padding, on lorakit train's allocator"}
ON_LORAKIT_ALLOCATOR = "cdehp"  # run as `lorakit train` runs them: on tcmalloc where installed (lorakit/allocator.py)
CURVE_WINDOW = 10  # steps per point of the smoothed loss curves compared in the summary


def gemm_bound_mfu(work: list[list[int]], rates: dict, useful_flops: float, peak: float) -> float:
    """The MFU of a step that did only its useful work: its frozen and head GEMMs at the rates
    measured at their shapes, the rest (LoRA, attention) at the peak. No implementation on these
    GEMM kernels gets above it."""
    gemm_flops = sum(2 * m * k * n * count for m, k, n, count in work)
    seconds = sum(2 * m * k * n * count / (rates[(m, k, n)] * 1e9) for m, k, n, count in work)
    seconds += max(useful_flops - gemm_flops, 0.0) / (peak * 1e9)
    return useful_flops / seconds / (peak * 1e9)


def child(args, variant: str) -> dict:
    """Run one variant (or 'init') in a fresh process; its RESULT line as a dict."""
    cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if variant in ON_LORAKIT_ALLOCATOR:
        env = allocator.preload_env(env)
    else:  # PEFT + Trainer as its users run it: on the system's malloc
        env.pop("LD_PRELOAD", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summarise(runs: list[dict], variants: dict[str, str]) -> list[dict]:
    """min / median of each variant's speed and MFU, and of the ratios within each round."""
    rows = []
    by = {(r["repeat"], r["variant"]): r for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        rows.append({"what": f"{variant} real tok/s", **min_median([r["real_tokens_per_s"] for r in mine])})
        rows.append({"what": f"{variant} MFU", **min_median([r["mfu"] for r in mine])})
    for ours, base in (("c", "a"), ("c", "b"), ("d", "b"), ("h", "b"), ("h", "c"), ("h", "p")):
        if ours not in variants or base not in variants:
            continue
        ratios = [by[(i, ours)]["real_tokens_per_s"] / by[(i, base)]["real_tokens_per_s"] for i in repeats]
        rows.append({"what": f"{ours} / {base} speed (same round)", **min_median(ratios)})
    for ours in [v for v in variants if v in "cdehp" and "b" in variants]:
        ratios = [by[(i, ours)]["peak_rss_mb"] / by[(i, "b")]["peak_rss_mb"] for i in repeats]
        rows.append({"what": f"{ours} / b peak memory", **min_median(ratios)})
        ratios = [by[(i, ours)]["training_peak_rss_mb"] / by[(i, "b")]["training_peak_rss_mb"] for i in repeats]
        rows.append({"what": f"{ours} / b training peak memory (loading left out)", **min_median(ratios)})
        gaps = [max(abs(c - b) / abs(b) for b, c in zip(by[(i, "b")]["losses"], by[(i, ours)]["losses"])) for i in repeats]
        rows.append({"what": f"{ours} vs b: largest relative loss gap per step", **min_median(gaps)})
    if "h" in variants and "p" in variants:  # against PEFT on the same allocator
        ratios = [by[(i, "h")]["peak_rss_mb"] / by[(i, "p")]["peak_rss_mb"] for i in repeats]
        rows.append({"what": "h / p peak memory", **min_median(ratios)})
    if "h" in variants and "c" in variants:  # the half base against the same loop in fp32, as a curve
        gaps = [curve_gap(by[(i, "c")]["losses"], by[(i, "h")]["losses"]) for i in repeats]
        rows.append({"what": f"h vs c: largest relative gap of the {CURVE_WINDOW}-step mean loss", **min_median(gaps)})
    return rows


def curve_gap(reference: list[float], other: list[float], window: int = CURVE_WINDOW) -> float:
    """Largest relative gap between the two loss curves, each a running mean over `window` steps
    (the whole run when it is shorter)."""
    window = min(window, len(reference))
    means = [(sum(reference[i - window : i]), sum(other[i - window : i])) for i in range(window, len(reference) + 1)]
    return max(abs(b - a) / abs(a) for a, b in means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every variant")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the variants take turns within each")
    parser.add_argument("--work-dir", default="runs/bench/train_throughput", help="initial adapter, Trainer output")
    parser.add_argument("--results-dir", default=None, help="where train_throughput.json goes (default runs/bench)")
    parser.add_argument("--record", default=None,
                        help="the record's name (default train_throughput, or train_throughput_<model-config>)")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                        help="build this model shape with random weights instead of loading --model's")
    parser.add_argument("--qlora", action="store_true", help="add variant e: lorakit on an NF4 base")
    parser.add_argument("--half", action="store_true", help="add variant h: lorakit with train.half_base auto")
    parser.add_argument("--allocator", action="store_true",
                        help="add variant p: b on the allocator lorakit train runs on (tcmalloc where installed)")
    parser.add_argument("--variants", default=None,
                        help="which variants run, e.g. bce (default: abcd, and e with --qlora, h with --half, p with --allocator)")
    parser.add_argument("--profile", type=int, default=0,
                        help="after its timed steps, each lorakit variant runs this many more under torch.profiler "
                             "and records where their time went (bench/step_profile.py)")
    parser.add_argument("--variant", choices=[*VARIANTS, *QLORA_VARIANT, *HALF_VARIANT, *ALLOCATOR_VARIANT, "init"],
                        help=argparse.SUPPRESS)  # children
    args = parser.parse_args()
    variants = {**VARIANTS, **(QLORA_VARIANT if args.qlora else {}), **(HALF_VARIANT if args.half else {}),
                **(ALLOCATOR_VARIANT if args.allocator else {})}
    if args.variants is not None and (not args.variants or set(args.variants) - set(variants)):
        parser.error(f"--variants {args.variants!r}: expected letters from {''.join(variants)}")
    variants = {v: what for v, what in variants.items() if args.variants is None or v in args.variants}
    if not 0 < args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup}: expected 1 to --steps - 1 ({args.steps - 1})")
    if args.variant:
        torch.manual_seed(0)
        run = {"init": lambda: prepare(args), "a": lambda: run_peft(args, "seed"), "b": lambda: run_peft(args, "dynamic"),
               "p": lambda: run_peft(args, "dynamic"),
               "c": lambda: run_lorakit(args), "d": lambda: run_lorakit(args, memory_mode=True),
               "e": lambda: run_lorakit(args, qlora=True), "h": lambda: run_lorakit(args, half=True)}[args.variant]
        print("RESULT " + json.dumps(run()))
        return

    info = child(args, "init")
    shapes = [tuple(s) for s in info["gemm_shapes"]]
    timed_flops = sum(info["useful_flops_per_step"][args.warmup :])
    work = [tuple(w) for w in info["gemm_work"]]
    shapes += [w[:3] for w in work if w[:3] not in shapes]
    mean_step = timed_flops / (args.steps - args.warmup)
    runs, gemm_seen, round_rates = [], [], []
    half_seen, half_round_rates = {"fp16": [], "bf16": []}, {"fp16": [], "bf16": []}
    for repeat in range(1, args.repeats + 1):
        rates = gemm_rates(shapes, onednn=True)
        round_rates.append(rates)
        gemm_seen.append(max(rates.values()))
        print(f"round {repeat}: fp32 GEMM at the model's shapes: best {max(rates.values()):.1f} GFLOP/s "
              f"(of {len(rates)} shapes, slowest {min(rates.values()):.1f})", flush=True)
        for name in half_seen if "h" in variants else ():
            half_round_rates[name].append(half_rates(shapes, HALF_TYPES[name], rates))
            half_seen[name].append(max(half_round_rates[name][-1].values()))
            print(f"  {name} GEMM at the model's shapes: best {half_seen[name][-1]:.1f} GFLOP/s", flush=True)
        for variant, what in variants.items():
            row = child(args, variant)
            row.update(repeat=repeat, variant=variant, useful_gflops_per_s=timed_flops / row["seconds"] / 1e9)
            runs.append(row)
            print(f"  {variant}  {what:<53} {row['real_tokens_per_s']:>8.1f} real tok/s "
                  f"{row['useful_gflops_per_s']:>7.2f} useful GFLOP/s {row['peak_rss_mb']:>7.0f} MB peak", flush=True)
    peak = max(gemm_seen)
    for row in runs:
        row["mfu"] = row["useful_gflops_per_s"] / (max(half_seen[row["half_base"]]) if row.get("half_base") else peak)
    bounds = [gemm_bound_mfu(work, rates, mean_step, peak) for rates in round_rates]
    half_bounds = {name: [gemm_bound_mfu(work, rates, mean_step, max(half_seen[name])) for rates in each
                          if len(rates) > 1]  # one rate: slower than fp32 here, timed at the largest shape only
                   for name, each in half_round_rates.items()
                   if any(row.get("half_base") == name for row in runs)}  # the type h multiplied in
    for name, each in half_bounds.items():
        print(f"h's GEMM-bound MFU ({name} GEMMs at their shapes' rates, the rest at {name}'s peak), per round: "
              f"{', '.join(f'{b:.1%}' for b in each)}")
    print(f"\nfp32 GEMM peak (highest of {len(gemm_seen)} measurements at the model's shapes): {peak:.1f} GFLOP/s")
    print("GEMM-bound MFU (a step doing only its useful work, its frozen and head GEMMs at the rates measured "
          f"at their shapes, LoRA and attention at the peak), per round: {', '.join(f'{b:.1%}' for b in bounds)}")
    print(f"{'round':>5} {'variant':<56} {'real tok/s':>10} {'MFU':>7} {'peak RSS MB':>12} {'training peak MB':>17}")
    for row in runs:
        print(f"{row['repeat']:>5} {row['variant']}  {variants[row['variant']]:<53} {row['real_tokens_per_s']:>10.1f} "
              f"{row['mfu']:>7.2%} {row['peak_rss_mb']:>12.0f} {row['training_peak_rss_mb']:>17.0f}")
    summary = summarise(runs, variants)
    for line in profile_notes(runs):
        print(line)
    print(f"\n{'':<48} {'min':>8} {'median':>8} {'max':>8}")
    for row in summary:
        print(f"{row['what']:<48} {row['min']:>8.4g} {row['median']:>8.4g} {row['max']:>8.4g}")
    for row in runs:
        row["variant"] = f"{row['variant']}: {variants[row['variant']]}"
    model = args.model if args.model_config is None else f"{args.model_config} shape (random weights)"
    path = write_result(
        args.record or "train_throughput" + (f"_{args.model_config}" if args.model_config else ""),
        "Training throughput, memory and MFU" + (f" at the {args.model_config} shape" if args.model_config else ""),
        runs,
        description=(f"{model}, r=8 LoRA on all seven projections, {args.steps} steps of {args.batch} ROS 2 "
                     f"examples (the same for every variant, from the same initial adapter), the first "
                     f"{args.warmup} untimed; the variants take turns in each of {args.repeats} rounds. MFU = useful "
                     f"FLOPs/s ({timed_flops / 1e9:.1f} GFLOP over the timed steps, lorakit.train.flops) / the "
                     "fp32 GEMM peak measured at the model's matrix shapes, the faster of MKL and oneDNN at each "
                     "(h: the peak of its half type)."),
        columns=[("repeat", "round"), ("variant", "variant"), ("real_tokens_per_s", "real tok/s"),
                 ("useful_gflops_per_s", "useful GFLOP/s"), ("mfu", "MFU"), ("peak_rss_mb", "peak RSS MB"),
                 ("training_peak_rss_mb", "training peak RSS MB"), ("allocator", "allocator"), ("seconds", "timed s")],
        summary=summary,
        machine_info=machine(gemm_gflops=round(peak, 2), gemm_gflops_each_round=[round(g, 2) for g in gemm_seen],
                             **{f"{k}_gemm_gflops_each_round": [round(g, 2) for g in v] for k, v in half_seen.items() if v}),
        notes=[(f"useful FLOPs per timed step: {mean_step / 1e9:.2f} GFLOP; "
                f"counted parameters: {info['flop_model']}"),
               ("GEMM-bound MFU per round (a step doing only its useful work: the frozen and head GEMMs at the "
                "rates measured at their own shapes, LoRA and attention at the peak; no implementation on these "
                f"GEMM kernels exceeds it): {', '.join(f'{b:.1%}' for b in bounds)}"),
               *(f"h's GEMM-bound MFU per round, as above with its frozen and head GEMMs in {name} at the rates "
                 f"measured at their shapes and the rest at {name}'s peak (its MFU's denominator): "
                 f"{', '.join(f'{b:.1%}' for b in each)}" for name, each in half_bounds.items()),
               *profile_notes(runs)],
        out_dir=args.results_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
