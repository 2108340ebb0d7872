"""Check GGUF export of a trained adapter in the real llama.cpp, against lorakit and llama.cpp's own converter.

    python bench/gguf_check.py --adapter runs/ros2-demo/adapter --data runs/ros2-data/test.jsonl

On the adapter merged into its base (default the make-demo adapter on SmolLM2-135M-Instruct):
  1. exports f32, f16 and q8_0 with lorakit (time, size);
  2. `lorakit generate` (greedy, the adapter's template) on the test instructions, and llama.cpp
     (llama-cpp-python, greedy, same prompt text, tokenized by llama.cpp) on each file: how many
     completions are the same text, and each one's exact-match score;
  3. llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python source
     distribution) on the merged model saved as a folder: tensors compared bit for bit with
     lorakit's f32 and f16 files, metadata keys listed where they differ, and its greedy outputs;
  4. f32 logits on 5 prompts, llama.cpp against lorakit (max abs);
  5. 1,000 varied strings tokenized by the GGUF tokenizer in llama.cpp against transformers;
  6. the adapter alone (gguf-lora) on the base GGUF against the merged export, 20 prompts, f32 —
     for the trained adapter and for rsLoRA and rank_pattern adapters of random weights.
Writes runs/bench/gguf_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "export"))  # probe_strings: the 1,000 tokenizer strings
sys.path.insert(0, str(ROOT / "bench"))  # results: the benches' shared JSON writer

from lorakit import load_adapter, merge_and_unload, save_adapter
from lorakit.config import LoraConfig
from lorakit.data.files import load_records
from lorakit.export import ExportConfig, export
from lorakit.export.gguf_diff import diff_gguf
from lorakit.export.gguf_export import resolve_template
from lorakit.export.llama_cpp_run import greedy_ids, load_llama, prompt_logits, tokenize
from lorakit.infer.generate import GenerationConfig, generate, stop_token_ids
from lorakit.lora.inject import inject
from lorakit.models import load_causal_lm, load_tokenizer, resolve_model
from lorakit.tasks import ros2

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def llama_cpp_source(cache: Path) -> Path:
    """The llama.cpp tree inside llama-cpp-python's sdist (downloaded with pip once, then cached)."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    tree = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(cache)], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as archive:
            archive.extractall(cache, filter="data")
    return tree


def llama_cpp_texts(llm, tokenizer, prompts, stop, max_new_tokens):
    """Greedy completions in llama.cpp; the prompt is tokenized by llama.cpp (BOS as the file says)."""
    out = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        new = greedy_ids(llm, ids, max_new_tokens, stop)
        out.append(llm.detokenize(new).decode("utf-8", errors="replace").strip())
    return out


def random_adapter(base: str, config: LoraConfig, out: Path) -> Path:
    model = load_causal_lm(base)
    inject(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name and name.endswith("B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_adapter(model, out)
    return out


def lora_agreement(base: str, adapter: Path, work: Path, tokenizer, prompts: list[str]) -> dict:
    paths = {k: work / f"{adapter.name}-{k}.gguf" for k in ("merged", "lora")}
    export(ExportConfig(model=base, adapter=str(adapter), outtype="f32", output=str(paths["merged"]), force=True))
    export(ExportConfig(model=base, adapter=str(adapter), format="gguf-lora", outtype="f32",
                        output=str(paths["lora"]), force=True))
    merged, on_base = load_llama(paths["merged"]), load_llama(work / "base-f32.gguf", lora=paths["lora"])
    stop = set(stop_token_ids(tokenizer, None))
    same = 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        same += greedy_ids(merged, ids, 32, stop) == greedy_ids(on_base, ids, 32, stop)
    return {"adapter": adapter.name, "same_greedy": same, "prompts": len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default="runs/ros2-demo/adapter",
                        help="the adapter to merge; 'random' makes one of random weights on the base (a stand-in "
                        "when no trained adapter is at hand), saved under --work")
    parser.add_argument("--data", default="runs/ros2-data/test.jsonl")
    parser.add_argument("--work", default="runs/gguf-check")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test records")
    parser.add_argument("--llama-cpp-src", default=str(Path.home() / ".cache" / "lorakit" / "llama-cpp-src"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "adapter": args.adapter, "data": args.data}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if args.adapter == "random":
        adapter = random_adapter(args.model, LoraConfig(r=8, lora_alpha=16, target_modules=targets), work / "random")
        (adapter / "lorakit.json").write_text(json.dumps({"template": "seed", "task": "ros2"}) + "\n")
        args.adapter = str(adapter)

    # 1. lorakit's exports
    exports = {}
    for outtype in ("f32", "f16", "q8_0"):
        r = export(ExportConfig(model=args.model, adapter=args.adapter, outtype=outtype,
                                output=str(work / f"merged-{outtype}.gguf"), force=True))
        exports[outtype] = {"seconds": round(r.seconds, 1), "bytes": r.bytes}
        print(f"export {outtype}: {r.bytes / 2**20:.1f} MiB in {r.seconds:.1f} s", flush=True)
    result["exports"] = exports

    # 2. lorakit generate against llama.cpp on the test instructions
    records = load_records(args.data)[: args.limit]
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    load_adapter(model, args.adapter)
    template = resolve_template(ExportConfig(model=args.model, adapter=args.adapter), tokenizer)
    prompts = [template.render({"instruction": r["instruction"], "output": ""})[0] for r in records]
    refs = [r["output"] for r in records]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=50)
    start = time.perf_counter()
    ours = generate(model, tokenizer, prompts, config)
    print(f"lorakit generate: {len(prompts)} prompts in {time.perf_counter() - start:.0f} s", flush=True)
    stop = set(stop_token_ids(tokenizer, model))
    scores = {"lorakit": ros2.score(ours, refs)}
    agreement = {}
    files = {f"lorakit-{t}": work / f"merged-{t}.gguf" for t in ("f16", "q8_0")}

    # 3. llama.cpp's own converter on the merged model
    merged = merge_and_unload(model)
    merged_dir = work / "merged-hf"
    merged.save_pretrained(merged_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model(args.model)).save_pretrained(merged_dir)
    tree = llama_cpp_source(Path(args.llama_cpp_src))
    reference = {}
    for outtype in ("f32", "f16"):
        ref_path = work / f"reference-{outtype}.gguf"
        start = time.perf_counter()
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(merged_dir), "--outtype", outtype,
                        "--outfile", str(ref_path)], check=True, capture_output=True)
        d = diff_gguf(ref_path, work / f"merged-{outtype}.gguf")
        reference[outtype] = {
            "reference_seconds": round(time.perf_counter() - start, 1), "reference_bytes": ref_path.stat().st_size,
            "tensors_equal": d.tensors_equal, "tensors_differing": d.tensors_differing,
            "tensors_only_in_reference": d.tensors_only_in_a, "tensors_only_in_lorakit": d.tensors_only_in_b,
            "keys_only_in_reference": {k: str(v)[:80] for k, v in d.keys_only_in_a.items()},
            "keys_only_in_lorakit": {k: str(v)[:80] for k, v in d.keys_only_in_b.items()},
            "keys_differing": {k: [str(a)[:80], str(b)[:80]] for k, (a, b) in d.keys_differing.items()},
        }
        print(f"reference {outtype}: {json.dumps(reference[outtype])}", flush=True)
    result["reference_converter"] = reference
    files["reference-f16"] = work / "reference-f16.gguf"

    for name, path in files.items():
        texts = llama_cpp_texts(load_llama(path), tokenizer, prompts, stop, args.max_new_tokens)
        scores[name] = ros2.score(texts, refs)
        agreement[name] = sum(a == b for a, b in zip(texts, ours))
        print(f"{name}: same text as lorakit {agreement[name]}/{len(ours)}, exact match "
              f"{scores[name]['exact_match']:.1%} (lorakit {scores['lorakit']['exact_match']:.1%})", flush=True)
    result["same_completion"] = agreement
    result["scores"] = scores

    # 4. f32 logits
    llm = load_llama(work / "merged-f32.gguf", logits_all=True, f32_cache=True)
    gaps = []
    for prompt in prompts[:5]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = merged(torch.tensor([ids])).logits[0].numpy()
        gaps.append(float(np.abs(prompt_logits(llm, ids) - expected).max()))
    result["f32_logits_max_abs"] = gaps
    print(f"f32 logits, max abs per prompt: {gaps}", flush=True)

    # 5. tokenizer
    from probe_strings import probe_strings

    llm = load_llama(work / "merged-f16.gguf")
    strings = probe_strings()
    mismatched = [s for s in strings if tokenize(llm, s) != tokenizer(s, add_special_tokens=False)["input_ids"]]
    result["tokenizer"] = {"strings": len(strings), "distinct": len(set(strings)), "mismatched": mismatched[:10],
                           "same": len(strings) - len(mismatched)}
    print(f"tokenizer: {len(strings) - len(mismatched)}/{len(strings)} strings tokenize the same", flush=True)

    # 6. the adapter alone on the base GGUF
    export(ExportConfig(model=args.model, outtype="f32", output=str(work / "base-f32.gguf"), force=True))
    lora_prompts = prompts[:20]
    cases = [Path(args.adapter)]
    cases.append(random_adapter(args.model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets),
                                work / "rslora"))
    cases.append(random_adapter(args.model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                       rank_pattern={"k_proj": 4, "down_proj": 2},
                                                       alpha_pattern={"v_proj": 4.0}), work / "rank_pattern"))
    result["lora_on_base"] = [lora_agreement(args.model, a, work, tokenizer, lora_prompts) for a in cases]
    print(f"adapter GGUF on base: {result['lora_on_base']}", flush=True)

    write_check(args, result, exports, len(prompts))


def write_check(args, result: dict, exports: dict, n: int) -> None:
    """runs/bench/gguf_check.json in the benches' shared shape: a row per decoder, the other checks as notes."""
    from results import write_result

    lorakit = result["scores"]["lorakit"]
    runs = [{"decoder": "lorakit generate (fp32, transformers)", "file": "", "mib": None,
             "same_text": f"{n}/{n}",
             "exact_match": round(100 * lorakit["exact_match"], 1), "em_gap": 0.0}]
    for name, count in result["same_completion"].items():
        outtype = name.split("-", 1)[1]
        size = exports[outtype]["bytes"] if name.startswith("lorakit") else \
            result["reference_converter"][outtype]["reference_bytes"]
        em = result["scores"][name]["exact_match"]
        runs.append({"decoder": "llama.cpp", "file": name, "mib": round(size / 2**20, 1),
                     "same_text": f"{count}/{n}", "exact_match": round(100 * em, 1),
                     "em_gap": round(100 * (em - lorakit["exact_match"]), 1)})
    ref = result["reference_converter"]
    notes = [
        f"llama.cpp's convert_hf_to_gguf.py on the merged model, against lorakit's file: {ref[t]['tensors_equal']} "
        f"tensors bit-identical, {len(ref[t]['tensors_differing'])} differing, metadata keys only in lorakit: "
        f"{', '.join(ref[t]['keys_only_in_lorakit']) or 'none'}; differing: {', '.join(ref[t]['keys_differing']) or 'none'} ({t})"
        for t in ref
    ]
    notes.append("f32 logits, llama.cpp against lorakit, max abs per prompt: "
                 + ", ".join(f"{g:.2e}" for g in result["f32_logits_max_abs"]))
    tok = result["tokenizer"]
    notes.append(f"tokenizer in llama.cpp against transformers: {tok['same']}/{tok['strings']} strings give the same ids")
    notes.append("adapter-only GGUF on the base GGUF against the merged export (f32, greedy, same text): "
                 + "; ".join(f"{c['adapter']} {c['same_greedy']}/{c['prompts']}" for c in result["lora_on_base"]))
    notes.append("exports: " + ", ".join(f"{t} {e['bytes'] / 2**20:.1f} MiB in {e['seconds']} s" for t, e in exports.items()))
    description = (f"The adapter {args.adapter} merged into {args.model}, exported by lorakit and run in llama.cpp "
                   f"(llama-cpp-python 0.3.36, greedy, the adapter's prompt template) on {n} "
                   f"records of {args.data}, beside lorakit generate on the same prompts.")
    columns = [("decoder", "decoder"), ("file", "GGUF"), ("mib", "MiB"), ("same_text", "same text as lorakit"),
               ("exact_match", "exact match %"), ("em_gap", "gap (points)")]
    path = write_result("gguf_check", "GGUF export checked in llama.cpp", runs, description=description,
                        columns=columns, notes=notes)
    (Path(args.work) / "gguf_check-details.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
