"""What a CPU decode step's products cost in each weight type PyTorch can multiply here, and what each does to
the output: the evidence for which weight types `lorakit serve` offers.

    python bench/decode_kernels.py [--model smollm2-135m-instruct] [--rows 1,2,3,4,8,16] [--repeats 5]

1. Speed: every linear weight of the model (the projections of all layers, and the output head) multiplied
   by B rows, as one decode step does, through each kernel; the kernels take turns in every round:
     fp32         torch.mm(W, x) on fp32 weights, x row-major (in, B) as a decode step keeps it (lora/base.py's
                  layout "weight")
     fp32-columns the same with x copied column-major, one row as two copies of itself (layout "columns")
     fp32-rows    (x^T W^T)^T, the rows made contiguous and W read transposed (layout "rows")
     fp32-kernel  lorakit's own product (lora/weight_kernel.py, layout "kernel"), where a C compiler built it
     fp32-few     lorakit's own product for 1 to 4 rows (weight_kernel.few_columns_product, layout "few"), likewise
     bf16, fp16   the same on weights cast to the half type (`lorakit serve --half-weights`)
     int8-dyn     PyTorch's dynamic int8 linear (quantized::linear_dynamic, x86 engine): int8 weights per
                  output channel, the activations quantised to int8 per tensor at each call
     int8-wo      weight-only int8 (aten::_weight_int8pack_mm): int8 weights per output channel, bf16
                  activations
     int8-kernel  lorakit's int8 product (lora/weight_kernel.py: int8_product): the same int8 weights, fp32
                  activations and sums, where a C compiler built it
   Printed and recorded: each round's time per kernel, and its ratio to fp32 in the same round; and the layout
   lora/base.py's measure_layouts picks at each row count on this machine (the one lorakit's step uses).
2. Output: greedy continuations (32 tokens) of 8 chat prompts with every linear (head included) in each
   type, against the fp32 model: how many of the 8 match it token for token, the mean number of tokens
   before the first difference, and the largest logit difference over the prompts' positions.
Writes runs/bench/decode_kernels.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results: the benches' shared JSON writer

from results import machine, min_median, write_result  # noqa: E402

from lorakit.lora import weight_kernel  # noqa: E402
from lorakit.lora.base import _product, measure_layouts  # noqa: E402
from lorakit.models import load_causal_lm, load_tokenizer  # noqa: E402

PROMPTS = [
    "Explain what a ROS 2 topic is.", "Write a haiku about the sea.", "List three prime numbers.",
    "What is the capital of France? Answer briefly.", "Translate 'good morning' into German.",
    "Describe how a LoRA adapter works.", "Give two tips for writing clear code.", "What does a compiler do?",
]
FP32_LAYOUTS = {"fp32": "weight", "fp32-columns": "columns", "fp32-rows": "rows"}  # lora/base.py's layouts
if weight_kernel.enabled() and weight_kernel.load() is not None:
    FP32_LAYOUTS["fp32-kernel"] = "kernel"
    FP32_LAYOUTS["fp32-few"] = "few"
KERNELS = [*FP32_LAYOUTS, "bf16", "fp16", "int8-dyn", "int8-wo"]
if weight_kernel.enabled() and weight_kernel.load() is not None:
    KERNELS.append("int8-kernel")


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 (out, in), fp32 scales (out,))."""
    scale = weight.abs().amax(1).clamp_min(1e-12) / 127
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Dynamic(nn.Module):
    """quantized::linear_dynamic on a weight quantised per output channel (activations per tensor)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        q, scale = int8_rows(weight)
        with warnings.catch_warnings():  # quantised tensors are deprecated as a tensor type, not this kernel
            warnings.simplefilter("ignore")
            zeros = torch.zeros(weight.shape[0], dtype=torch.long)
            packed = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(), zeros, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed, self.out = torch.ops.quantized.linear_prepack(packed, bias), weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return torch.ops.quantized.linear_dynamic(rows, self.packed, True).view(*x.shape[:-1], self.out)


class Int8WeightOnly(nn.Module):
    """aten::_weight_int8pack_mm: int8 weights per output channel, bf16 activations, fp32 in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.q, scale = int8_rows(linear.weight.detach().float())
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scale).float()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.q.shape[0])


class Int8Kernel(Int8WeightOnly):
    """lorakit's int8 product on the same int8 weights: fp32 activations and sums, scaled per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.scale = self.scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = weight_kernel.int8_product(rows.t(), self.q, self.scale).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.q.shape[0])


class HalfLinear(nn.Module):
    """A linear whose weight is kept in a half type, fp32 in and out."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).float()
        return out if self.bias is None else out + self.bias


def converted(model: nn.Module, kernel: str) -> nn.Module:
    """A copy of `model` with every nn.Linear (the head too) computing through `kernel`."""
    if kernel == "fp32":
        return model
    out = copy.deepcopy(model)
    if out.get_output_embeddings() is not None and out.config.tie_word_embeddings:
        out.lm_head.weight = nn.Parameter(out.lm_head.weight.detach().clone())  # converted on its own
    make = {"bf16": lambda m: HalfLinear(m, torch.bfloat16), "fp16": lambda m: HalfLinear(m, torch.float16),
            "int8-dyn": Int8Dynamic, "int8-wo": Int8WeightOnly, "int8-kernel": Int8Kernel}[kernel]  # fmt: skip
    for name, module in list(out.named_modules()):
        if type(module) is nn.Linear:
            out.set_submodule(name, make(module))
    return out


def step_products(weights: list[torch.Tensor], kernel: str, rows: int):
    """A function multiplying `rows` inputs by every weight through `kernel`, as one decode step does."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    if kernel in FP32_LAYOUTS:  # lorakit's own product, x feature-major (in, B) as its decode step keeps it
        columns = {k: x.t().contiguous() for k, x in inputs.items()}
        return lambda: [_product(columns[w.shape[1]], w, FP32_LAYOUTS[kernel]) for w in weights]
    if kernel in ("bf16", "fp16"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[kernel]
        cast = [w.to(dtype) for w in weights]
        columns = {k: x.t().contiguous().to(dtype) for k, x in inputs.items()}
        return lambda: [torch.mm(w, columns[w.shape[1]]) for w in cast]
    if kernel == "int8-kernel":  # x feature-major, as lorakit's step hands it to the kernel
        quantised = [int8_rows(w) for w in weights]
        columns = {k: x.t().contiguous() for k, x in inputs.items()}
        return lambda: [weight_kernel.int8_product(columns[q.shape[1]], q, s) for q, s in quantised]
    layers = [(Int8Dynamic if kernel == "int8-dyn" else Int8WeightOnly)(_linear(w)) for w in weights]
    return lambda: [layer(inputs[w.shape[1]]) for layer, w in zip(layers, weights)]


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return linear


def greedy(model, tokenizer, prompt: str, tokens: int) -> list[int]:
    chat = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def speed(weights: list[torch.Tensor], rows_list: list[int], repeats: int) -> list[dict]:
    """Each round: one pass over all weights per kernel, the kernels taking turns."""
    runs = []
    for rows in rows_list:
        products = {kernel: step_products(weights, kernel, rows) for kernel in KERNELS if takes(kernel, rows)}
        for run in products.values():
            run()  # warm-up: oneDNN and fbgemm prepare their kernels on first use
        for repeat in range(repeats):
            times = {}
            for kernel, run in products.items():
                start = time.perf_counter()
                run()
                times[kernel] = time.perf_counter() - start
            for kernel, seconds in times.items():
                runs.append({"part": "speed", "rows": rows, "round": repeat, "kernel": kernel,
                             "ms": seconds * 1000, "vs_fp32": times["fp32"] / seconds})  # fmt: skip
            cells = "  ".join(f"{k} {s * 1000:6.1f} ms" for k, s in times.items())
            print(f"  {rows:>2} rows  round {repeat}  {cells}", flush=True)
    return runs


def takes(kernel: str, rows: int) -> bool:
    """Whether `kernel` multiplies `rows` rows (the few-rows product: at most weight_kernel.FEW_COLUMNS)."""
    return kernel != "fp32-few" or rows <= weight_kernel.FEW_COLUMNS


def output_check(model, tokenizer, tokens: int) -> list[dict]:
    """Greedy outputs and logits of the model with every linear in each type, against fp32."""
    reference = [greedy(model, tokenizer, p, tokens) for p in PROMPTS]
    probe = tokenizer(PROMPTS[0] + " " + PROMPTS[5], return_tensors="pt").input_ids
    with torch.no_grad():
        fp32_logits = model(probe).logits
    runs = []
    for kernel in KERNELS[len(FP32_LAYOUTS):]:  # the fp32 layouts compute the same numbers
        other = converted(model, kernel)
        outputs = [greedy(other, tokenizer, p, tokens) for p in PROMPTS]
        agree = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r)) for r, o in zip(reference, outputs)]
        with torch.no_grad():
            drift = (other(probe).logits - fp32_logits).abs().max().item()
        same = sum(o == r for o, r in zip(outputs, reference))
        runs.append({"part": "output", "kernel": kernel, "same_outputs": same, "prompts": len(PROMPTS),
                     "tokens_before_first_difference": sum(agree) / len(agree),
                     "max_logit_difference": drift})  # fmt: skip
        print(f"  {kernel:<9} same greedy output {same}/{len(PROMPTS)}, tokens before the first difference "
              f"{sum(agree) / len(agree):.1f}, max logit difference {drift:.3f}", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", default="1,2,3,4,8,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt for the output check")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    torch.backends.quantized.engine = "x86"
    tokenizer, model = load_tokenizer(args.model), load_causal_lm(args.model).eval()
    weights = [m.weight.detach().float().contiguous() for m in model.modules() if type(m) is nn.Linear]
    layouts = measure_layouts()
    print(f"  measure_layouts: {layouts}", flush=True)
    runs = speed(weights, [int(r) for r in args.rows.split(",")], args.repeats)
    runs += output_check(model, tokenizer, args.tokens)
    summary = []
    for rows in sorted({r["rows"] for r in runs if r["part"] == "speed"}):
        for kernel in [k for k in KERNELS[1:] if takes(k, rows)]:
            ratios = [r["vs_fp32"] for r in runs if r.get("rows") == rows and r["kernel"] == kernel]
            summary.append({"what": f"{rows} rows: fp32 time / {kernel} time (same round)", **min_median(ratios)})
    path = write_result(
        "decode_kernels", "Decode-step products per weight type, and what each does to the output", runs,
        description=(
            f"{args.model}: every nn.Linear weight (projections and head, {sum(w.numel() for w in weights) / 1e6:.0f}M "
            "parameters) multiplied by a decode step's rows through each kernel, kernels taking turns each round "
            "(ms: one pass over all weights). Output: greedy continuations of "
            f"{len(PROMPTS)} chat prompts ({args.tokens} tokens) with every linear in that type, against fp32."
        ),
        columns=[("part", "part"), ("rows", "rows"), ("round", "round"), ("kernel", "kernel"), ("ms", "ms"),
                 ("vs_fp32", "fp32 / this"), ("same_outputs", "same outputs"), ("prompts", "prompts"),
                 ("tokens_before_first_difference", "tokens before a difference"),
                 ("max_logit_difference", "max logit diff")],
        summary=summary, machine_info=machine(device="cpu"), out_dir=args.results_dir,
        notes=[f"layouts lora/base.py's measure_layouts picked here, rows -> layout: {layouts}"],
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
