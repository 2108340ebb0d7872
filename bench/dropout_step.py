"""A training step with LoRA dropout: its masks drawn and applied by lorakit's kernel against torch, side by side.

    python bench/dropout_step.py [--model smollm2-135m-instruct] [--dropout 0.05] [--rounds 10] [--batch 8]

One process, one model: --model with r=8 LoRA on all seven projections and lora_dropout --dropout, on the
fused paths with the frozen base as `train.half_base: auto` keeps it (lorakit.train.lean.use_fused_paths), and
batches of --batch ROS 2 examples packed to 256 tokens. A step is forward, backward and an AdamW update. After
two untimed steps, each of --rounds rounds times one step with the masks drawn and applied by
lorakit.lora.dropout_mask and one with LORAKIT_DROPOUT_KERNEL=0 (torch.rand_like(x) >= p, then x * keep), on the
same batch, in alternating order. The two give the same masks and products to the bit
(tests/lora/test_dropout_mask.py), so the steps do the same work. Prints every round, then min /
median and each round's ratio; writes runs/bench/dropout_step.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from results import machine, min_median, write_result
from train_variants import examples, load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WAYS = {"kernel": "1", "rand_like": "0"}  # LORAKIT_DROPOUT_KERNEL for each


def ratios(runs: list[dict]) -> list[float]:
    """rand_like's step time over the kernel's, per round."""
    by = {(run["round"], run["masks"]): run["seconds"] for run in runs}
    return [by[(r, "rand_like")] / by[(r, "kernel")] for r in sorted({run["round"] for run in runs})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import lorakit
    from lorakit.lora import dropout_mask
    from lorakit.models import load_tokenizer
    from lorakit.train.lean import use_fused_paths
    from lorakit.train.objectives import CausalLMObjective

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    shape = argparse.Namespace(model=args.model, model_config=None, batch=args.batch, steps=args.rounds + 2)
    data = examples(tokenizer, shape)
    model = load_model(shape)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=TARGETS))
    applied = use_fused_paths(model.train(), True, True, "auto")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    objective = CausalLMObjective(tokenizer.pad_token_id, pack_length=256)
    batches = [objective.collate(data[i * args.batch : (i + 1) * args.batch]) for i in range(args.rounds + 2)]

    def step(batch) -> float:
        start = time.perf_counter()
        (objective.loss_sum(model, batch) / objective.count(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for batch in batches[:2]:
        step(batch)
    runs, order = [], list(WAYS)
    for index in range(args.rounds):
        for masks in order:
            os.environ["LORAKIT_DROPOUT_KERNEL"] = WAYS[masks]
            dropout_mask._works.cache_clear()  # the switch is read at a process's first mask
            runs.append({"round": index + 1, "masks": masks, "seconds": step(batches[2 + index])})
            print(f"round {index + 1}  {masks:<9} {runs[-1]['seconds']:.3f} s", flush=True)
        order.reverse()
    os.environ.pop("LORAKIT_DROPOUT_KERNEL")
    summary = [{"what": f"{masks} s/step", **min_median([r["seconds"] for r in runs if r["masks"] == masks])}
               for masks in WAYS]
    summary.append({"what": "rand_like / kernel step time (same round)", **min_median(ratios(runs))})
    for row in summary:
        print(f"{row['what']:<45} min {row['min']:.3f}  median {row['median']:.3f}  max {row['max']:.3f}")
    path = write_result(
        "dropout_step", "A training step with LoRA dropout: masks drawn and applied by lorakit's kernel against torch",
        runs,
        description=(f"{args.model}, r=8 on all seven projections, lora_dropout {args.dropout}, fused paths, frozen "
                     f"base {applied.get('half_base') or 'fp32'} (train.half_base auto), {args.batch} ROS 2 examples "
                     "packed to 256 tokens a step, forward + backward + AdamW; the masks drawn and applied by the "
                     "kernel or by torch (rand_like, x * keep), the same to the bit, taking turns on the same batch in "
                     f"each of {args.rounds} rounds."),
        summary=summary, columns=[("round", "round"), ("masks", "masks"), ("seconds", "step s")],
        machine_info=machine(),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
