"""E2E NLG with LoRA, scored like the LoRA paper's Table 3, printed beside the paper's rows.

    python bench/e2e.py [--config examples/e2e/config.yaml] [--test-mrs N] [--decoding greedy|beam|both]
                        [--adapter DIR] [--section.key VALUE ...]

Trains through the normal `lorakit train` path (`run.run`: data.format e2e, a seeded sample of the
train set of data.max_train_examples pairs, train.max_minutes as a time budget, the best
checkpoint by eval loss on a dev subset), then decodes the test set's distinct meaning
representations (all 630, or the first --test-mrs of them in file order) and scores every output
against all of its MR's references: BLEU against the official references and against loralib's
tokenised ones, NIST, METEOR, ROUGE-L, CIDEr (lorakit.tasks.e2e). Writes <output_dir>/bench.json and
one predictions file per decoding. --adapter DIR skips training and scores that adapter.

Smoke run (a few minutes):
    python bench/e2e.py --test-mrs 20 --data.max_train_examples 200 --train.max_minutes 2 \\
        --data.max_eval_examples 40 --train.eval_steps 10 --train.save_steps 10 --train.output_dir runs/e2e-smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorakit.checkpoint.peft_io import load_adapter, read_adapter_weights
from lorakit.config_loading import load_run_config
from lorakit.data.e2e import aligned_references, group_references, read_e2e_csv, read_lora_format
from lorakit.data.templates import get_template
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.models import default_device, load_causal_lm, load_tokenizer
from lorakit.run import run
from lorakit.tasks.e2e import METRICS, PAPER_ROWS, score_e2e

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/e2e/config.yaml")
    parser.add_argument("--data-dir", default=str(DATA), help="the E2E folder with original/ and lora_format/")
    parser.add_argument("--adapter", help="score this adapter instead of training one")
    parser.add_argument("--test-mrs", type=int, help="decode only the first N test MRs (default: all 630)")
    parser.add_argument("--decoding", choices=["greedy", "beam", "both"], default="greedy")
    parser.add_argument("--num-beams", type=int, default=10, help="beam search width (the paper: 10)")
    parser.add_argument("--length-penalty", type=float, default=0.9, help="beam search length penalty (the paper: 0.9)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=4, help="beam search n-gram blocking (the paper: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    return parser.parse_known_args()


def decodings(args) -> dict[str, GenerationConfig]:
    # References are one line: an output is cut at its first line break (a trained adapter stops at EOS first).
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop=("\n",))
    beam = GenerationConfig(
        num_beams=args.num_beams, length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        **{**common, "batch_size": max(1, args.batch_size // 4)},  # beams multiply the batch's memory
    )
    chosen = {"greedy": GenerationConfig(**common), "beam": beam}
    return chosen if args.decoding == "both" else {args.decoding: chosen[args.decoding]}


def trainable_params(adapter_dir: str) -> int:
    """Parameters in the saved adapter: what LoRA trained (PEFT's count of trainable parameters)."""
    return sum(t.numel() for t in read_adapter_weights(adapter_dir).values())


def pairs_seen(config, summary: dict) -> int:
    """Train pairs the run went through: steps x examples per step, at most the sample's epochs
    (train.max_minutes can stop a run before its last step)."""
    per_step = config.train.batch_size * config.train.grad_accum
    sample = config.data.max_train_examples
    return summary["steps"] * per_step if sample is None else min(summary["steps"] * per_step, int(sample * config.train.epochs))


def table(rows: list[dict]) -> str:
    """The paper's layout: Method | # trainable params | BLEU | NIST | METEOR | ROUGE-L | CIDEr."""
    head = ["Method", "# trainable params", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"]
    digits = {"bleu": 1, "nist": 2, "meteor": 1, "rouge_l": 1, "cider": 2}
    lines = [[r["method"], r["trainable"]] + [_fmt(r.get(m), digits[m]) for m in METRICS] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    return "\n".join(out + [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines])


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    args, overrides = parse_args()
    config = load_run_config(args.config, overrides)
    out = Path(config.train.output_dir)
    started = time.time()
    summary = run(config) if not args.adapter else {"adapter": args.adapter}
    adapter_dir = summary["adapter"]

    data = Path(args.data_dir)
    rows = read_e2e_csv(data / "original" / "testset_w_refs.csv")
    test = group_references(rows).take(args.test_mrs)
    tokenised = aligned_references(test, read_lora_format(data / "lora_format" / "test.txt"), "lora_format/test.txt")
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model).to(default_device())
    rank = load_adapter(model, adapter_dir).r
    template = get_template(config.data.template, tokenizer)
    prompts = [template.render({"instruction": p, "output": ""})[0] for p in test.prompts]
    trainable = trainable_params(adapter_dir)
    total = sum(p.numel() for p in model.parameters())  # base + adapter, as PEFT's trainable% counts

    result = {"model": config.model, "adapter": adapter_dir, "test_mrs": len(test), "test_references": len(rows) if
              args.test_mrs is None else sum(map(len, test.references)), "trainable_params": trainable,
              "trainable_percent": round(100 * trainable / total, 3), "train": {k: summary.get(k) for k in ("steps", "seconds", "eval", "best_checkpoint")},
              "train_sample": config.data.max_train_examples if not args.adapter else None,
              "train_pairs_seen": pairs_seen(config, summary) if not args.adapter else None, "decodings": {}}
    table_rows = list(PAPER_ROWS)
    for name, generation in decodings(args).items():
        t0 = time.time()
        preds = generate(model, tokenizer, prompts, generation)
        seconds = time.time() - t0
        scores = score_e2e(preds, test.references, tokenised)
        (out / f"predictions-{name}.txt").write_text("\n".join(preds) + "\n", encoding="utf-8")
        result["decodings"][name] = {**scores, "decode_seconds": round(seconds, 1), "config": vars(generation)}
        table_rows.append({"method": f"{config.model} LoRA r={rank}, {name} (ours)",
                           "trainable": f"{trainable / 1e6:.2f}M", **scores})
    result["wall_seconds"] = round(time.time() - started, 1)
    (out / "bench.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    subset = "all 630" if args.test_mrs is None else f"the first {len(test)} of 630 (file order)"
    trained = (f"trained {summary['steps']} steps in {summary['seconds']} s: {result['train_pairs_seen']:,d} pairs "
               f"of a {config.data.max_train_examples:,d}-pair sample; "
               if not args.adapter else f"adapter {adapter_dir}; ")
    print(f"\nE2E NLG test set: {subset} MRs, {result['test_references']} references; {trained}"
          f"trainable {trainable:,d} = {result['trainable_percent']}% of {total:,d}")
    print(table(table_rows))
    for name, scores in result["decodings"].items():
        extra = f"BLEU vs loralib's tokenised refs (MT-Eval style, lowercased): {_fmt(scores['bleu_tokenised'], 1)}"
        notes = "; ".join(f"{k}: {v}" for k, v in scores["notes"].items())
        print(f"{name}: {extra}; decoded in {scores['decode_seconds']} s" + (f"; n/a: {notes}" if notes else ""))
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
