"""Serving throughput with many adapters on one base: lorakit's mixed batches against PEFT.

    python bench/serve_throughput.py [--model smollm2-135m-instruct] [--adapters 16] [--requests 16]
                                     [--new-tokens 32] [--rank 8] [--repeats 3] [--skip-peft]
                                     [--device cuda|cpu]

The same --requests ROS 2 prompts (left-padded, greedy, exactly --new-tokens new tokens each) in
one batch, on the same base, with --adapters rank-r adapters on all seven projections (random
non-zero B, so they differ), saved once as PEFT folders that both libraries load:
  merged     one adapter merged into the base, every request through it (lorakit's loop)
  merged-hf  the same merged model through transformers' generate (the issue's baseline)
  mixed-4    the requests spread over 4 adapters in one batch (lorakit's default: the stacked LoRA term)
  mixed-N    spread over all N adapters (the default: gathered per row; and grouped: one LoRA matmul
             per adapter)
  peft-mixed PEFT's mixed batch, generate(..., adapter_names=[...])
  peft-switch PEFT, set_adapter then generate per group of requests sharing an adapter
Each variant runs --warmup times untimed, then --repeats times; the best time counts. merged,
merged-hf and the mixed batches take turns within each repeat, so the ratios compare runs made side
by side. PEFT's variants, 3-10x slower, run at most twice. Models run on --device (the GPU when
there is one). The process keeps freed memory (serve/malloc.py), as `lorakit serve` does. Prints
generated tokens/s and the ratios the issue asks for; writes runs/bench/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(args, root: Path) -> list[str]:
    """Save --adapters random adapters as PEFT folders under root; returns their names."""
    import lorakit
    from lorakit.models import load_causal_lm

    model = load_causal_lm(args.model)
    names = [f"a{i}" for i in range(args.adapters)]
    generator = torch.Generator().manual_seed(0)
    for name in names:
        lorakit.inject(
            model, lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS), name
        )
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f".adapters.{name}.B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        lorakit.save_adapter(model, root / name, name)
    return names


def prompts(tokenizer, n: int) -> list[str]:
    from lorakit.tasks.ros2 import make_split

    return [f"### Instruction:\n{r['instruction']}\n\n### Command:\n" for r in make_split("test", n, seed=0)]


def timed(fn, args, label: str, repeats: int | None = None) -> float:
    """Best wall time of --repeats (or `repeats`) runs of fn after --warmup untimed ones."""
    return timed_rounds({label: fn}, args, repeats)[label]


def timed_rounds(variants: dict, args, repeats: int | None = None) -> dict[str, float]:
    """Best wall time of each variant over --repeats rounds, each round running every variant once
    in turn (after --warmup untimed runs of each): a drift of the machine's speed then hits all of
    them alike instead of whichever ran during it."""
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats or args.repeats):
        for label, fn in variants.items():
            _sync(args.device)
            start = time.perf_counter()
            fn()
            _sync(args.device)
            best[label] = min(best[label], time.perf_counter() - start)
    for label, seconds in best.items():
        print(f"  measured {label:<20} {seconds:.2f} s", flush=True)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_lorakit(args, root: Path, names: list[str], texts: list[str]) -> dict[str, float]:
    import lorakit
    from lorakit.infer.multi_adapter import Request, generate_mixed
    from lorakit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    times = {}

    def run(model, adapters, strategy="auto"):
        requests = [Request(p, a, args.new_tokens, ignore_eos=True) for p, a in zip(ids, adapters)]
        return lambda: generate_mixed(model, tokenizer, requests, strategy=strategy)

    merged = lorakit.merge_and_unload(_with_adapters(load_causal_lm(args.model), root, names[:1])).to(args.device)
    model = _with_adapters(load_causal_lm(args.model), root, names).to(args.device)
    variants = {
        "merged": run(merged, [None] * len(ids)),
        "merged-hf": lambda: _hf_generate(merged, tokenizer, texts, args.new_tokens),
    }
    spreads = {k: [names[i % k] for i in range(len(ids))] for k in sorted({min(4, len(names)), len(names)})}
    variants.update({f"mixed-{k}": run(model, spread) for k, spread in spreads.items()})
    times.update(timed_rounds(variants, args))  # side by side: the ratios the issue asks for come from here
    for k, spread in spreads.items():
        times[f"mixed-{k}-grouped"] = timed(run(model, spread, "grouped"), args, f"mixed-{k}-grouped")
    return times


def _with_adapters(model, root: Path, names: list[str]):
    import lorakit

    for name in names:
        lorakit.load_adapter(model, root / name, name)
    return model


def _hf_generate(model, tokenizer, texts: list[str], new_tokens: int, **kwargs):
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    tokenizer.padding_side = side
    with torch.no_grad():  # min_new_tokens: every row makes exactly new_tokens tokens, as ignore_eos does
        return model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )


def run_peft(args, root: Path, names: list[str], texts: list[str]) -> dict[str, float]:
    from peft import PeftModel

    from lorakit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = PeftModel.from_pretrained(
        load_causal_lm(args.model).to(args.device), root / names[0], adapter_name=names[0]
    ).eval()
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    spread = [names[i % len(names)] for i in range(len(texts))]
    times = {
        "peft-mixed": timed(
            lambda: _hf_generate(model, tokenizer, texts, args.new_tokens, adapter_names=spread),
            args,
            "peft-mixed",
            min(2, args.repeats),
        )
    }

    def switching():
        for name in dict.fromkeys(spread):
            model.set_adapter(name)
            _hf_generate(model, tokenizer, [t for t, a in zip(texts, spread) if a == name], args.new_tokens)

    times["peft-switch"] = timed(switching, args, "peft-switch", min(2, args.repeats))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each variant")
    parser.add_argument("--skip-peft", action="store_true", help="lorakit variants only")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the GPU when there is one)")
    parser.add_argument("--output", default="runs/bench/serve_throughput.json")
    args = parser.parse_args()
    from lorakit.models import default_device
    from lorakit.serve.malloc import keep_freed_memory

    keep_freed_memory()  # as `lorakit serve` does; for every variant, PEFT's included

    args.device = args.device or str(default_device())
    torch.manual_seed(0)

    from lorakit.models import load_tokenizer

    texts = prompts(load_tokenizer(args.model), args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(args, Path(tmp))
        times = run_lorakit(args, Path(tmp), names, texts)
        if not args.skip_peft:
            times.update(run_peft(args, Path(tmp), names, texts))
    tokens = args.requests * args.new_tokens
    rates = {k: tokens / v for k, v in times.items()}
    print(
        f"{args.model} on {_device_name(args.device)}: {args.requests} requests x {args.new_tokens} new tokens, "
        f"{args.adapters} rank-{args.rank} adapters"
    )
    for key, rate in rates.items():
        print(f"  {key:<20} {rate:8.1f} tok/s   ({times[key]:.2f} s)")
    n = f"mixed-{args.adapters}"
    ratios = {f"{n} / merged": rates[n] / rates["merged"], f"{n} / merged-hf": rates[n] / rates["merged-hf"]}
    if "peft-mixed" in rates:
        ratios[f"{n} / peft-mixed"] = rates[n] / rates["peft-mixed"]
        ratios[f"{n} / peft-switch"] = rates[n] / rates["peft-switch"]
    for key, value in ratios.items():
        print(f"  {key:<28} {value:6.2f}x")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": vars(args), "device": _device_name(args.device), "threads": torch.get_num_threads(),
        "tokens_per_s": rates, "ratios": ratios,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
