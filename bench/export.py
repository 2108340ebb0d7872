"""GGUF export and llama.cpp decoding speed of the merged demo model, beside `lorakit generate`.

    python bench/export.py --adapter runs/ros2-demo/adapter --data runs/ros2-data/test.jsonl

Per outtype (f32, f16, q8_0): export time and file size. Then, on the same 16 test prompts
(greedy, up to --max-new-tokens each): generated tokens per second of llama.cpp (llama-cpp-python)
one sequence at a time and 16 sequences in one batch (llama.cpp's batch API, one sequence id per
prompt), and of `lorakit generate` (the merged fp32 model in transformers) at batch 1 and 16.
Rates are new tokens over wall time, prompt processing included. Every repeat is printed and
kept; the variants take turns within each repeat. Writes runs/bench/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lorakit import load_adapter, merge_and_unload
from lorakit.data.files import load_records
from lorakit.export import ExportConfig, export
from lorakit.export.gguf_export import resolve_template
from lorakit.export.llama_cpp_run import greedy_ids, load_llama
from lorakit.infer.generate import GenerationConfig, generate, stop_token_ids
from lorakit.models import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def llama_cpp_batched(path: Path, prompts: list[list[int]], max_new: int, stop: set[int]) -> list[list[int]]:
    """Greedy decoding of all prompts at once: one llama_batch per step, one sequence id per prompt."""
    import llama_cpp as L

    threads = len(os.sched_getaffinity(0))
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx = len(prompts) * (max(map(len, prompts)) + max_new + 8)
    params.n_batch = params.n_ubatch = max(512, sum(map(len, prompts)))
    params.n_seq_max = len(prompts)
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(params.n_batch, 0, 1)
    try:
        def run(entries):  # entries: (token, pos, seq, want_logits)
            for i, (token, pos, seq, want) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, want
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(entries)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = [i for i, e in enumerate(entries) if e[3]]
            return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))
                    for i in rows]

        entries = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        nexts = run(entries)
        outputs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(max_new):
            step = []
            for seq, token in zip(active, nexts):
                if token not in stop:
                    outputs[seq].append(token)
                    step.append(seq)
            active = [s for s in step if len(outputs[s]) < max_new]
            if not active:
                break
            nexts = run([(outputs[s][-1], len(prompts[s]) + len(outputs[s]) - 1, s, True) for s in active])
        return outputs
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default="runs/ros2-demo/adapter")
    parser.add_argument("--data", default="runs/ros2-data/test.jsonl")
    parser.add_argument("--work", default="runs/export-bench")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []

    for repeat in range(1, args.repeats + 1):
        for outtype in ("f32", "f16", "q8_0"):
            r = export(ExportConfig(model=args.model, adapter=args.adapter, outtype=outtype,
                                    output=str(work / f"merged-{outtype}.gguf"), force=True))
            runs.append({"repeat": repeat, "variant": f"export {outtype}", "seconds": round(r.seconds, 2),
                         "mib": round(r.bytes / 2**20, 1)})
            print(json.dumps(runs[-1]), flush=True)

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    load_adapter(model, args.adapter)
    model = merge_and_unload(model).eval()
    template = resolve_template(ExportConfig(model=args.model, adapter=args.adapter), tokenizer)
    records = load_records(args.data)[: args.prompts]
    prompts = [template.render({"instruction": r["instruction"], "output": ""})[0] for r in records]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    stop = set(stop_token_ids(tokenizer, model))
    llms = {t: load_llama(work / f"merged-{t}.gguf", n_ctx=512) for t in ("f32", "f16", "q8_0")}

    def lorakit_run(batch: int):
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch)
        texts = generate(model, tokenizer, prompts, config)
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    for repeat in range(1, args.repeats + 1):
        variants = {
            **{f"llama.cpp {t} batch 1": (lambda t=t: sum(len(greedy_ids(llms[t], ids, args.max_new_tokens, stop))
                                                          for ids in prompt_ids)) for t in llms},
            **{f"llama.cpp {t} 16 sequences": (lambda t=t: sum(map(len, llama_cpp_batched(
                work / f"merged-{t}.gguf", prompt_ids, args.max_new_tokens, stop)))) for t in llms},
            "lorakit generate batch 1": lambda: lorakit_run(1),
            "lorakit generate batch 16": lambda: lorakit_run(16),
        }
        for name, fn in variants.items():
            tokens, seconds = timed(fn)
            runs.append({"repeat": repeat, "variant": name, "new_tokens": tokens, "seconds": round(seconds, 2),
                         "tokens_per_s": round(tokens / seconds, 1)})
            print(json.dumps(runs[-1]), flush=True)

    def median(variant, key):
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    summary = []
    for t in ("f32", "f16", "q8_0"):
        for batch, ours in (("batch 1", "lorakit generate batch 1"), ("16 sequences", "lorakit generate batch 16")):
            values = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(
                [r for r in runs if r["variant"] == f"llama.cpp {t} {batch}"],
                [r for r in runs if r["variant"] == ours])]
            summary.append({"what": f"llama.cpp {t} {batch} / {ours}", "min": round(min(values), 2),
                            "median": round(statistics.median(values), 2)})
    for row in summary:
        print(json.dumps(row))
    record_result(runs, summary, args, {t: median(f"export {t}", "mib") for t in ("f32", "f16", "q8_0")})


def record_result(runs, summary, args, sizes) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    description = (
        f"lorakit export of the make-demo adapter merged into SmolLM2-135M-Instruct (sizes MiB: {sizes}); "
        f"greedy decoding of {args.prompts} ROS 2 test prompts, up to {args.max_new_tokens} new tokens, "
        "in llama.cpp (llama-cpp-python 0.3.36, CPU) and in lorakit generate (transformers, fp32)."
    )
    try:
        from results import write_result  # the benches' shared JSON writer, where the tree has it
    except ImportError:
        out = ROOT / "runs" / "bench" / "export.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"bench": "export", "title": "GGUF export and llama.cpp decoding",
                                   "description": description, "command": " ".join(["python", *sys.argv]),
                                   "runs": runs, "summary": summary}, indent=1) + "\n")
        print(f"wrote {out}")
        return
    path = write_result("export", "GGUF export and llama.cpp decoding", runs, description=description,
                        summary=summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
