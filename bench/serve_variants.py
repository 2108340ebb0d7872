"""The variants bench/serve_throughput.py times, each a callable that generates once: random adapters saved as
PEFT folders (make_adapters), the prompts, lorakit's merged baselines and mixed batches (lorakit_variants) and
PEFT's (peft_variants). The variants are described in serve_throughput.py's docstring."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from model_shapes import base_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(args, root: Path) -> list[str]:
    """Save --adapters random adapters as PEFT folders under root; returns their names."""
    import lorakit

    model = base_model(args.model, getattr(args, "model_config", None))
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


def lorakit_variants(args, root: Path, names: list[str], ids: list[list[int]], texts: list[str], tokenizer) -> dict:
    """The merged baselines and lorakit's mixed batches, as callables that each generate once."""
    import lorakit
    from lorakit.infer.decode_linears import use_decode_linears
    from lorakit.infer.multi_adapter import Request, generate_mixed

    def load_base():  # --model's weights, or --model-config's shape
        return base_model(args.model, args.model_config)

    def run(model, adapters, strategy="auto"):
        requests = [Request(p, a, args.new_tokens, ignore_eos=True) for p, a in zip(ids, adapters)]
        return lambda: generate_mixed(model, tokenizer, requests, strategy=strategy)

    def merged_model():
        return lorakit.merge_and_unload(_with_adapters(load_base(), root, names[:1])).to(args.device)

    merged = use_decode_linears(merged_model())  # as `lorakit serve` prepares its model
    model = _with_adapters(use_decode_linears(load_base()), root, names).to(args.device)
    plain = functools.cache(merged_model)  # transformers' generate on its own nn.Linears, loaded when run
    variants = {
        "merged": run(merged, [None] * len(ids)),
        "merged-hf": lambda: _hf_generate(plain(), tokenizer, texts, args.new_tokens),
    }
    spreads = {k: [names[i % k] for i in range(len(ids))] for k in sorted({min(4, len(names)), len(names)})}
    variants.update({f"mixed-{k}": run(model, spread) for k, spread in spreads.items()})
    variants.update({f"mixed-{k}-grouped": run(model, spread, "grouped") for k, spread in spreads.items()})
    variants["merged-forward"] = _through_the_forward(variants["merged"])
    variants[f"mixed-{len(names)}-forward"] = _through_the_forward(variants[f"mixed-{len(names)}"])
    if args.half_weights:
        from lorakit.infer.half_weights import use_half_weights

        merged_half = lorakit.merge_and_unload(_with_adapters(load_base(), root, names[:1]))
        half_model = load_base()
        half = use_half_weights(half_model, args.half_weights)  # auto decides once, for both
        use_half_weights(merged_half, half or "off")
        print(f"--half-weights {args.half_weights}: {half or 'fp32 (no half type is faster here)'}")
        variants["merged-half"] = run(use_decode_linears(merged_half).to(args.device), [None] * len(ids))
        half_model = _with_adapters(use_decode_linears(half_model), root, names).to(args.device)
        variants[f"mixed-{len(names)}-half"] = run(half_model, spreads[len(names)])
    from lorakit.infer.int8_weights import use_int8_weights

    for quantize in args.quantize:
        merged_int8 = lorakit.merge_and_unload(_with_adapters(load_base(), root, names[:1]))
        use_int8_weights(merged_int8, quantize)
        variants[f"merged-{quantize}"] = run(use_decode_linears(merged_int8).to(args.device), [None] * len(ids))
        int8_model = load_base()
        use_int8_weights(int8_model, quantize)
        int8_model = _with_adapters(use_decode_linears(int8_model), root, names).to(args.device)
        variants[f"mixed-{len(names)}-{quantize}"] = run(int8_model, spreads[len(names)])
    from lorakit.lora.adapters import LORA_DTYPES

    for lora_dtype in args.lora_dtype:  # the adapters rounded to each --lora-dtype, on the fp32 base and int8 ones
        for suffix, quantize in [("", None)] + [(f"-{q}", q) for q in args.quantize]:
            narrow = load_base()
            if quantize:
                use_int8_weights(narrow, quantize)
            narrow = _with_adapters(use_decode_linears(narrow), root, names, LORA_DTYPES[lora_dtype])
            variants[f"mixed-{len(names)}{suffix}-lora-{lora_dtype}"] = run(narrow.to(args.device), spreads[len(names)])
    return variants


def _through_the_forward(fn):
    """fn with every decode step through the model's own forward."""
    from lorakit.infer.decode_step import through_the_forward

    def run():
        with through_the_forward():
            return fn()

    return run


def _with_adapters(model, root: Path, names: list[str], lora_dtype=None):
    """model with the adapters `names` loaded; each rounded to lora_dtype's values where given (serve's
    --lora-dtype)."""
    import lorakit
    from lorakit.lora.adapters import round_adapter

    for name in names:
        lorakit.load_adapter(model, root / name, name)
        if lora_dtype is not None:
            round_adapter(model, name, lora_dtype)
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


def peft_variants(args, root: Path, names: list[str], texts: list[str], tokenizer) -> dict:
    """PEFT's mixed batch and adapter switching, as callables that each generate once."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        base_model(args.model, args.model_config).to(args.device), root / names[0], adapter_name=names[0]
    ).eval()
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    spread = [names[i % len(names)] for i in range(len(texts))]

    def switching():
        for name in dict.fromkeys(spread):
            model.set_adapter(name)
            _hf_generate(model, tokenizer, [t for t, a in zip(texts, spread) if a == name], args.new_tokens)

    return {
        "peft-mixed": lambda: _hf_generate(model, tokenizer, texts, args.new_tokens, adapter_names=spread),
        "peft-switch": switching,
    }
