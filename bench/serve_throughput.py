"""Serving throughput with many adapters on one base: lorakit's mixed batches against merged and PEFT.

    python bench/serve_throughput.py [--model smollm2-135m-instruct] [--adapters 16] [--requests 16]
                                     [--new-tokens 32] [--rank 8] [--repeats 3] [--turns 1] [--warmup 1] [--skip-peft]
                                     [--device cuda|cpu] [--results-dir DIR] [--variants merged,mixed-16]
                                     [--half-weights auto|bf16|fp16] [--quantize int8,w8a8] [--lora-dtype bf16,int8]
                                     [--model-config qwen2.5-1.5b] [--name NAME]

The same --requests ROS 2 prompts (left-padded, greedy, exactly --new-tokens new tokens each) in
one batch, on the same base, with --adapters rank-r adapters on all seven projections (random
non-zero B, so they differ), saved once as PEFT folders that both libraries load:
  merged            one adapter merged into the base, every request through it, lorakit's decode loop
                    (every lorakit variant decodes on the linears `lorakit serve` uses: use_decode_linears)
  merged-hf         the same merged weights in transformers' own nn.Linears, through transformers' generate
  merged-forward    merged, every decode step through the model's own forward rather than lorakit's
                    feature-major step (infer/decode_step.py)
  mixed-4           the requests spread over 4 adapters in one batch (lorakit's default strategy)
  mixed-N           spread over all N adapters (the default strategy)
  mixed-K-grouped   the same spreads with one LoRA matmul per adapter (strategy "grouped")
  mixed-N-forward   mixed-N, every decode step through the model's own forward
  peft-mixed        PEFT's mixed batch, generate(..., adapter_names=[...])
  peft-switch       PEFT, set_adapter then generate per group of requests sharing an adapter
and with --half-weights (infer/half_weights.py: linear weights in a half type, adapters in fp32):
  merged-half       merged, then its linear weights cast
  mixed-N-half      mixed-N on a base whose linear weights are cast (as `lorakit serve --half-weights`)
and with --quantize Q, Q one or more of int8 and w8a8 (infer/int8_weights.py: linear weights and head in
int8, adapters in fp32; w8a8: the products' inputs rounded to int8 too, as llama.cpp's q8_0):
  merged-Q          merged, then its linear weights quantised (what llama.cpp's q8_0 export of it holds)
  mixed-N-Q         mixed-N on a base whose linear weights are int8 (as `lorakit serve --quantize Q`)
and with --lora-dtype D, D one or more of bf16 and int8 (lora/adapters.py: round_adapter, as `lorakit serve
--lora-dtype D`):
  mixed-N-lora-D    mixed-N with every adapter's factors rounded to D (bf16: the mixed batch reads them at
                    half the bytes; int8, values times a power of two per rank: a quarter); mixed-N-Q-lora-D
                    the same on each --quantize base
--model-config NAME builds NAME's published shape with random weights instead (bench/model_shapes.py;
the prompts are still tokenised by --model's tokenizer) and writes serve_throughput_NAME.json, so the
cost of many adapters can be compared across model sizes. --name NAME writes serve_throughput_NAME.json
instead (after any --model-config part), a record kept beside the main one.
Every variant runs --warmup times untimed, then all of them take turns in each of --repeats
rounds (PEFT's included; --turns K: K turns a round, the round's figure over a variant's K runs),
in --variants' order and in reverse every other turn, so that a drift of the machine's speed hits
neighbours alike (list each variant beside its baseline). Every round's figure is printed, then min /
median per variant, and the ratios of mixed-N to both merged baselines and
to PEFT, each taken within a round. Models run on --device (the GPU when there is one). The
process keeps freed memory (serve/malloc.py), as `lorakit serve` does. Writes
runs/bench/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from model_shapes import MODEL_CONFIGS
from results import host_speed, machine, min_median, record_name, write_result
from serve_variants import lorakit_variants, make_adapters, peft_variants, prompts

from lorakit.serve.config import QUANTIZE


def timed_rounds(variants: dict, args) -> list[dict]:
    """Each variant --warmup times untimed, then --repeats rounds in which the variants take --turns turns, each
    variant running once a turn, in their order and in reverse every other turn (a drift of the machine's speed
    then hits neighbours alike: put each variant beside its baseline); returns one {"repeat", "turn", "variant",
    "seconds"} per timed run, in the order they ran."""
    for label, fn in variants.items():
        for _ in range(args.warmup):
            fn()
        print(f"  warmed up {label}", flush=True)
    runs, order = [], list(variants.items())
    for repeat in range(1, args.repeats + 1):
        for turn in range(1, args.turns + 1):
            for label, fn in order:
                _sync(args.device)
                start = time.perf_counter()
                fn()
                _sync(args.device)
                runs.append({"repeat": repeat, "turn": turn, "variant": label, "seconds": time.perf_counter() - start})
                print(f"  round {repeat} turn {turn}  {label:<20} {runs[-1]['seconds']:.2f} s", flush=True)
            order.reverse()
    return runs


def round_figures(runs: list[dict], tokens: int) -> list[dict]:
    """One {"repeat", "variant", "seconds", "tokens_per_s"} per round and variant: its turns' tokens over their
    summed seconds."""
    rounds: dict[tuple[int, str], list[float]] = {}
    for run in runs:
        rounds.setdefault((run["repeat"], run["variant"]), []).append(run["seconds"])
    return [{"repeat": repeat, "variant": variant, "seconds": sum(seconds),
             "tokens_per_s": tokens * len(seconds) / sum(seconds)} for (repeat, variant), seconds in rounds.items()]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summarise(runs: list[dict], args) -> list[dict]:
    """min / median tok/s per variant, and ratios of mixed-N to the baselines taken within each round."""
    rows = []
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    rate = {(r["repeat"], r["variant"]): r["tokens_per_s"] for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    for variant in variants:
        rows.append({"what": f"{variant} tok/s", **min_median([rate[(i, variant)] for i in repeats])})
    pairs = [(f"mixed-{args.adapters}", base) for base in ("merged", "merged-hf", "peft-mixed", "peft-switch")]
    pairs += [(f"mixed-{args.adapters}-half", "merged-half"), ("merged-half", "merged"),
              (f"mixed-{args.adapters}-half", "merged"), ("merged", "merged-forward"),
              (f"mixed-{args.adapters}", f"mixed-{args.adapters}-forward"),
              (f"mixed-{args.adapters}-forward", "merged-forward")]
    for q in args.quantize:
        pairs += [(f"mixed-{args.adapters}-{q}", f"merged-{q}"), (f"merged-{q}", "merged"),
                  (f"mixed-{args.adapters}-{q}", "merged")]
    pairs += [("merged-w8a8", "merged-int8")]
    pairs += [(f"mixed-{args.adapters}{q}-lora-{lora_dtype}", base) for lora_dtype in args.lora_dtype
              for q in ["", *[f"-{q}" for q in args.quantize]]
              for base in (f"merged{q}", f"mixed-{args.adapters}{q}")]
    for ours, base in pairs:
        if base in variants and ours in variants:
            rows.append({"what": f"{ours} / {base}", **min_median([rate[(i, ours)] / rate[(i, base)] for i in repeats])})
    if "peft-mixed" in variants:
        for base in [b for b in ("merged", "merged-hf") if b in variants]:
            rows.append({"what": f"peft-mixed / {base}",
                         **min_median([rate[(i, "peft-mixed")] / rate[(i, base)] for i in repeats])})
    return rows


def variant_labels(args) -> list[str]:
    """Every variant this bench can time for --adapters (PEFT's unless --skip-peft)."""
    spreads = sorted({min(4, args.adapters), args.adapters})
    labels = ["merged", "merged-hf", *[f"mixed-{k}" for k in spreads], *[f"mixed-{k}-grouped" for k in spreads]]
    labels += ["merged-forward", f"mixed-{args.adapters}-forward"]
    labels += ["merged-half", f"mixed-{args.adapters}-half"] if args.half_weights else []
    labels += [label for q in args.quantize for label in (f"merged-{q}", f"mixed-{args.adapters}-{q}")]
    labels += [f"mixed-{args.adapters}{q}-lora-{lora_dtype}" for lora_dtype in args.lora_dtype
               for q in ["", *[f"-{q}" for q in args.quantize]]]
    return labels + ([] if args.skip_peft else ["peft-mixed", "peft-switch"])


def chosen_variants(parser: argparse.ArgumentParser, args) -> list[str] | None:
    """The labels --variants names, in its order (None: all); an unknown label exits with code 2 and one line."""
    if args.variants is None:
        return None
    chosen, known = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip())), variant_labels(args)
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        parser.exit(2, f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}\n")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                        help="that shape with random weights instead of --model's (prompts still use its tokenizer)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=1,
                        help="runs of each variant a round, taking turns; the round's figure is over their summed time")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each variant")
    parser.add_argument("--skip-peft", action="store_true", help="lorakit variants only")
    parser.add_argument("--half-weights", choices=["auto", "bf16", "fp16"], default=None,
                        help="add merged-half and mixed-N-half: linear weights in a half type (auto: where faster)")
    parser.add_argument("--quantize", type=_settings(QUANTIZE[1:]), default=[],
                        help="int8 and/or w8a8, comma-separated: add merged-Q and mixed-N-Q for each, linear weights "
                        "and head in int8 (w8a8: inputs rounded to int8 too), adapters fp32")
    parser.add_argument("--lora-dtype", type=_settings(("bf16", "int8")), default=[],
                        help="bf16 and/or int8, comma-separated: add mixed-N-lora-DTYPE for each, the adapters' "
                        "factors rounded to DTYPE (serve --lora-dtype)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the GPU when there is one)")
    parser.add_argument("--results-dir", default=None, help="where serve_throughput.json goes (default runs/bench)")
    parser.add_argument("--name", default=None, type=record_name,
                        help="write serve_throughput_NAME.json, a record beside the main one (e.g. other settings)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated labels to time, in the order they take turns, e.g. merged,mixed-16 "
                        "(default: all of them)")
    args = parser.parse_args()
    args.variants = chosen_variants(parser, args)
    from lorakit.models import default_device
    from lorakit.serve.malloc import keep_freed_memory

    keep_freed_memory()  # as `lorakit serve` does; for every variant, PEFT's included
    speed = host_speed()

    args.device = args.device or str(default_device())
    torch.manual_seed(0)

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    texts = prompts(tokenizer, args.requests)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(args, Path(tmp))
        variants = lorakit_variants(args, Path(tmp), names, ids, texts, tokenizer)
        if not args.skip_peft:
            variants.update(peft_variants(args, Path(tmp), names, texts, tokenizer))
        if args.variants is not None:
            variants = {label: variants[label] for label in args.variants}  # in the order given
        runs = timed_rounds(variants, args)
    tokens = args.requests * args.new_tokens
    for run in runs:
        run["tokens_per_s"] = tokens / run["seconds"]
    rounds = round_figures(runs, tokens)
    print(
        f"\n{args.model_config or args.model} on {_device_name(args.device)}: {args.requests} requests x "
        f"{args.new_tokens} new tokens, {args.adapters} rank-{args.rank} adapters; generated tok/s in each round:"
    )
    repeats = sorted({r["repeat"] for r in rounds})
    print(f"  {'variant':<20}" + "".join(f"{'round ' + str(i):>10}" for i in repeats))
    for variant in variants:
        print(f"  {variant:<20}" + "".join(f"{r['tokens_per_s']:>10.1f}" for r in rounds if r["variant"] == variant))
    summary = summarise(rounds, args)
    print(f"\n  {'':<32} {'min':>8} {'median':>8} {'max':>8}")
    for row in summary:
        print(f"  {row['what']:<32} {row['min']:>8.2f} {row['median']:>8.2f} {row['max']:>8.2f}")
    shape = (f" at the {args.model_config} shape" if args.model_config else "") + (f" ({args.name})" if args.name else "")
    model = f"{args.model_config} shape (random weights)" if args.model_config else args.model
    path = write_result(
        "serve_throughput" + "".join(f"_{part}" for part in (args.model_config, args.name) if part),
        "Serving throughput: many adapters in one batch" + shape, runs,
        description=(f"{model}: {args.requests} requests x {args.new_tokens} new tokens (greedy, every row "
                     f"exactly that long), {args.adapters} rank-{args.rank} adapters on all seven projections. "
                     "merged: one adapter merged, lorakit's decode loop on the linears lorakit serve uses; merged-hf: "
                     "the same merged weights in transformers' own nn.Linears, through transformers' generate; "
                     "mixed-K: the requests spread over K adapters in one lorakit batch; merged-forward, "
                     "mixed-K-forward: the same with every decode step through the model's own forward instead of "
                     "lorakit's feature-major step; "
                     "peft-mixed: PEFT's generate(adapter_names=...); peft-switch: PEFT, set_adapter per group. "
                     + ("merged-half, mixed-K-half: linear weights in a half type (lorakit serve --half-weights); "
                        if args.half_weights else "")
                     + ("merged-int8, mixed-K-int8: linear weights and head in int8, one scale per output channel, "
                        "adapters in fp32 (lorakit serve --quantize int8). " if "int8" in args.quantize else "")
                     + ("merged-w8a8, mixed-K-w8a8: the same int8 weights, each product's inputs rounded to int8 per "
                        "block of 32 as llama.cpp's q8_0 rounds them, multiplied in int8 (lorakit serve --quantize "
                        "w8a8). " if "w8a8" in args.quantize else "")
                     + ("mixed-K-lora-bf16: every adapter's factors rounded to bf16 (lorakit serve --lora-dtype "
                        "bf16), read at half the bytes, computed in fp32. " if "bf16" in args.lora_dtype else "")
                     + ("mixed-K-lora-int8: every adapter's ranks rounded to int8 values times a power of two "
                        "(lorakit serve --lora-dtype int8), read at a quarter of the bytes, computed in fp32. "
                        if "int8" in args.lora_dtype else "")
                     + f"All variants take turns in each of {args.repeats} rounds after {args.warmup} untimed run(s), "
                     "in the order listed and in reverse every other turn"
                     + (f", {args.turns} turns a round; a round's figure is a variant's {args.turns} runs' tokens over "
                        "their summed seconds" if args.turns > 1 else "")
                     + "; ratios are taken within a round."),
        columns=[("repeat", "round"), *([("turn", "turn")] if args.turns > 1 else []), ("variant", "variant"),
                 ("tokens_per_s", "generated tok/s"), ("seconds", "s")],
        summary=summary, machine_info=machine(device=_device_name(args.device), **speed), out_dir=args.results_dir,
    )
    print(f"wrote {path}")


def _settings(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: one or more of `allowed`, comma-separated (a list)."""
    def parse(text: str) -> list[str]:
        settings = [s.strip() for s in text.split(",") if s.strip()]
        if not settings or any(s not in allowed for s in settings):
            raise argparse.ArgumentTypeError(f"expected {' and/or '.join(allowed)}, comma-separated, got {text!r}")
        return settings

    return parse


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
