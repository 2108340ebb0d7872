"""Decode speed of one to a few streams: lorakit's decode loop beside llama.cpp's, on the same merged model.

    python bench/decode_speed.py [--model smollm2-135m-instruct] [--rows 1,2,4,16] [--prompt 64] [--new-tokens 32]
                                 [--repeats 5] [--threads 2] [--batched-bench PATH] [--gguf f32] [--quantize w8a8]

One rank-8 adapter (random, non-zero) merged into --model, then:
  lorakit            the merged model prepared as `lorakit serve` prepares it (use_decode_linears), --rows requests
                     of a --prompt-token prompt, greedy, decoded by generate_mixed
  lorakit-4k-pages   the same with its weights left where they were loaded (LORAKIT_HUGE_PAGES=0)
  lorakit-op-by-op   the same with each layer's small operations as torch calls (no decode_layer.c call)
  lorakit-Q          with --quantize Q (int8 or w8a8): the merged model's linear weights and head in int8, as
                     `lorakit serve --quantize Q` prepares them (w8a8: their inputs rounded to int8 too, as llama.cpp's
                     q8_0 rounds them; compare it with --gguf q8_0)
  llama-T            llama.cpp's llama-batched-bench (the build `make llama-server` makes) on the same merged model
                     exported by `lorakit export --outtype T`: -npp --prompt -ntg --new-tokens -npl rows -t --threads
Each figure is decode tokens per second, prompt pass and first token left out on both sides: lorakit's time for
--new-tokens + 1 tokens less its time for 1, llama.cpp's S_TG. The systems take turns in every round (the order
reversed every other round), every round printed; the ratios are taken within a round (lorakit over every other
system, and lorakit-Q over llama-q8_0). Writes runs/bench/decode_speed.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results: the benches' shared JSON writer

from results import machine, min_median, write_result  # noqa: E402
from serve_variants import make_adapters  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCHED_BENCH = Path.home() / ".cache" / "lorakit" / "llama.cpp-build" / "bin" / "llama-batched-bench"


def lorakit_systems(args, adapter: Path) -> dict:
    """name -> (rows -> decode tok/s) for lorakit's variants, each on its own copy of the merged model."""
    import lorakit
    from lorakit.infer import decode_layer
    from lorakit.infer.decode_linears import use_decode_linears
    from lorakit.infer.int8_weights import use_int8_weights
    from lorakit.infer.multi_adapter import Request, generate_mixed
    from lorakit.models import load_causal_lm, load_tokenizer
    from lorakit.serve.malloc import keep_freed_memory

    keep_freed_memory()  # as `lorakit serve` runs
    tokenizer = load_tokenizer(args.model)

    def merged(huge_pages: bool, quantize: str | None = None):
        model = load_causal_lm(args.model).eval()
        lorakit.load_adapter(model, adapter, "a")
        os.environ["LORAKIT_HUGE_PAGES"] = "1" if huge_pages else "0"
        try:
            model = lorakit.merge_and_unload(model)
            if quantize:
                use_int8_weights(model, quantize)
            return use_decode_linears(model)
        finally:
            os.environ.pop("LORAKIT_HUGE_PAGES")

    def system(model, layer_call: bool):
        def tok_s(rows: int) -> float:
            prompts = [[(1000 + 7 * r + i) % 40000 + 100 for i in range(args.prompt)] for r in range(rows)]
            serves = decode_layer.serves
            decode_layer.serves = serves if layer_call else (lambda rows: False)
            try:
                seconds = []
                for tokens in (1, args.new_tokens + 1):
                    start = time.perf_counter()
                    generate_mixed(model, tokenizer, [Request(p, None, tokens, ignore_eos=True) for p in prompts])
                    seconds.append(time.perf_counter() - start)
            finally:
                decode_layer.serves = serves
            return rows * args.new_tokens / (seconds[1] - seconds[0])
        return tok_s

    huge, small = merged(True), merged(False)
    systems = {"lorakit": system(huge, True), "lorakit-4k-pages": system(small, True),
               "lorakit-op-by-op": system(huge, False)}
    if getattr(args, "quantize", None):
        systems[f"lorakit-{args.quantize}"] = system(merged(True, args.quantize), True)
    return systems


def llama_systems(args, adapter: Path, root: Path) -> dict:
    """name -> (rows -> S_TG tok/s) for llama-batched-bench on each --gguf export; empty without the binary."""
    binary = Path(args.batched_bench)
    if not binary.is_file():
        print(f"  llama-batched-bench not found at {binary} (make llama-server builds it): llama.cpp left out")
        return {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    systems = {}
    for kind in args.gguf.split(","):
        gguf = root / f"merged-{kind}.gguf"
        subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", args.model, "--adapter", str(adapter),
                        "--outtype", kind, "--output", str(gguf)], check=True, env=env, stdout=subprocess.DEVNULL)

        def tok_s(rows: int, gguf=gguf) -> float:
            out = subprocess.run([str(binary), "-m", str(gguf), "-npp", str(args.prompt), "-ntg", str(args.new_tokens),
                                  "-npl", str(rows), "-t", str(args.threads), "-c", str(rows * (args.prompt +
                                  args.new_tokens) + 64)], capture_output=True, text=True, check=True).stdout
            return s_tg(out, args.prompt)
        systems[f"llama-{kind}"] = tok_s
    return systems


def s_tg(table: str, prompt: int) -> float:
    """llama-batched-bench's decode tok/s (S_TG) from its table's row for `prompt` prompt tokens."""
    line = next(line for line in table.splitlines() if re.match(rf"\|\s+{prompt}\s+\|", line))
    return float(line.strip().strip("|").split("|")[7])  # PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG


def summarise(runs: list[dict]) -> list[dict]:
    """Per row count: each system's tok/s (min / median), and lorakit over each other system within a round, and an
    int8 lorakit (lorakit-int8, lorakit-w8a8) over llama-q8_0."""
    summary = []
    for rows in sorted({r["rows"] for r in runs}):
        figures = {}
        for r in runs:
            if r["rows"] == rows:
                figures.setdefault(r["system"], {})[r["round"]] = r["tok_s"]
        for name, per_round in figures.items():
            summary.append({"what": f"{rows} rows: {name} tok/s", **min_median(list(per_round.values()))})
        pairs = [("lorakit", name) for name in figures if name != "lorakit"]
        pairs += [(name, "llama-q8_0") for name in ("lorakit-int8", "lorakit-w8a8") if name in figures]
        for ours, other in pairs:
            if ours in figures and other in figures:
                ratios = [figures[ours][k] / figures[other][k] for k in figures[ours] if k in figures[other]]
                summary.append({"what": f"{rows} rows: {ours} / {other} (same round)", **min_median(ratios)})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", default="1,2,4,16")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batched-bench", default=str(BATCHED_BENCH))
    parser.add_argument("--gguf", default="f32", help="GGUF types for llama.cpp, comma-separated")
    parser.add_argument("--quantize", choices=["int8", "w8a8"], default=None,
                        help="add lorakit-Q: the merged model's weights in int8, as lorakit serve --quantize Q")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = root / make_adapters(argparse.Namespace(model=args.model, adapters=1, rank=8), root)[0]
        systems = {**lorakit_systems(args, adapter), **llama_systems(args, adapter, root)}
        runs = []
        for rows in [int(r) for r in args.rows.split(",")]:
            for system in systems.values():  # warm-up: kernels built, layouts timed, caches filled
                system(rows)
            for repeat in range(1, args.repeats + 1):
                order = list(systems) if repeat % 2 else list(systems)[::-1]
                for name in order:
                    runs.append({"rows": rows, "round": repeat, "system": name, "tok_s": systems[name](rows)})
                    print(f"  {rows} rows, round {repeat}: {name} {runs[-1]['tok_s']:.1f} tok/s", flush=True)
    summary = summarise(runs)
    path = write_result(
        "decode_speed", "Decode speed of a few streams: lorakit beside llama.cpp", runs,
        description=(
            f"{args.model} with one rank-8 adapter merged; {args.prompt}-token prompts, {args.new_tokens} greedy "
            f"tokens per row; decode tokens per second (prompt pass and first token left out), {args.threads} threads. "
            "lorakit: generate_mixed on the model `lorakit serve` prepares; lorakit-4k-pages: its weights not moved "
            "onto huge pages; lorakit-op-by-op: each layer's small operations as torch calls, not one C call; "
            + (f"lorakit-{args.quantize}: its linear weights and head in int8 (lorakit serve --quantize "
               f"{args.quantize}); " if args.quantize else "")
            + "llama-*: llama.cpp's llama-batched-bench (S_TG) on the `lorakit export` of the same merged model. "
            "The systems take turns in each round."
        ),
        columns=[("rows", "rows"), ("round", "round"), ("system", "system"), ("tok_s", "tok/s")],
        summary=summary, machine_info=machine(device="cpu"), out_dir=args.results_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
