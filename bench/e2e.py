"""E2E NLG with LoRA beside the LoRA paper's GPT-2 rows (Table 3), every row under the E2E challenge's scorer.

    python bench/e2e.py [--config examples/e2e/config.yaml] [--test-mrs N] [--decoding greedy|beam|both]
                        [--adapter DIR] [--out runs/bench/e2e.json] [--section.key VALUE ...]

Trains through the normal `lorakit train` path (`run.run`: data.format e2e, a seeded sample of the
train set of data.max_train_examples pairs, train.max_minutes as a time budget, the checkpoint with
the lowest eval loss on a dev subset: no training or decoding choice sees the test set), then
decodes the test set's distinct meaning representations (all 630, or the first --test-mrs in file
order) with the decodings asked for (fixed settings, reported side by side, none picked on the test
set) and scores them with lorakit.tasks.e2e, the challenge's own rules (measure_scores.py: MT-Eval
BLEU/NIST, MS-COCO METEOR/ROUGE-L/CIDEr after PTB tokenisation):

* against the official references (testset_w_refs.csv): the challenge's setup;
* against loralib's tokenised references (lora_format/test.txt): the setup of the paper's rows,
  which its authors scored with the same measure_scores.py (Python MT-Eval) on those references.

sacreBLEU (13a, cased, official references) is printed as a last, labelled column: not a challenge
metric. --adapter DIR skips training and scores that adapter. Writes the JSON record to --out and
each decoding's outputs as <output_dir>/predictions-<decoding>.tsv (MR<TAB>output: score them
again with `lorakit eval --task e2e --predictions FILE`).

Smoke run (a few minutes):
    python bench/e2e.py --test-mrs 20 --data.max_train_examples 200 --train.max_minutes 2 \\
        --data.max_eval_examples 40 --train.eval_steps 10 --train.save_steps 10 \\
        --train.output_dir runs/e2e-smoke --out runs/e2e-smoke/e2e.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import shlex
import sys
import time
from pathlib import Path

from results import TREE_AT_START, machine

from lorakit.checkpoint.peft_io import load_adapter, read_adapter_weights
from lorakit.config_loading import load_run_config
from lorakit.data.e2e import aligned_references, group_references, read_e2e_csv, read_lora_format
from lorakit.data.templates import get_template
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.models import default_device, load_causal_lm, load_tokenizer
from lorakit.run import run
from lorakit.tasks.e2e import (
    LABELS,
    METRICS,
    SACREBLEU_LABEL,
    SCORER,
    CocoScorers,
    coco_unavailable,
    score_challenge,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e"
OFFICIAL_REFS = "official (testset_w_refs.csv)"
LORALIB_REFS = "loralib tokenised (lora_format/test.txt)"
PAPER_SCORER = ("Hu et al. 2021 (LoRA), Table 3: GPT-2 on the E2E test set, beam search; scored by the authors "
                "with the challenge's measure_scores.py (Python MT-Eval) against loralib's tokenised references")
COLUMNS = [("method", "Method"), ("trainable", "# trainable params"), ("scored_by", "scored by"),
           ("references", "references"), *((m, LABELS[m]) for m in METRICS), ("bleu_sacrebleu", "sacreBLEU*")]
PAPER_ROWS = [
    {"method": "GPT-2 M (FT), paper", "trainable": "354.92M", "bleu": 68.2, "nist": 8.62, "meteor": 46.2, "rouge_l": 71.0, "cider": 2.47},
    {"method": "GPT-2 M (LoRA), paper", "trainable": "0.35M", "bleu": 70.4, "nist": 8.85, "meteor": 46.8, "rouge_l": 71.8, "cider": 2.53},
    {"method": "GPT-2 L (LoRA), paper", "trainable": "0.77M", "bleu": 70.4, "nist": 8.89, "meteor": 46.8, "rouge_l": 72.0, "cider": 2.47},
]


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
    parser.add_argument("--out", default="runs/bench/e2e.json", help="where the JSON record goes")
    return parser.parse_known_args()


def decodings(args) -> dict[str, GenerationConfig]:
    # References are one line: an output is cut at its first line break (a trained adapter stops at EOS first).
    common = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "stop": ("\n",)}
    beam = GenerationConfig(
        num_beams=args.num_beams, length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        **{**common, "batch_size": max(1, args.batch_size // 4)},  # beams multiply the batch's memory
    )
    chosen = {"greedy": GenerationConfig(**common), "beam": beam}
    return chosen if args.decoding == "both" else {args.decoding: chosen[args.decoding]}


def pairs_seen(config, summary: dict) -> int:
    """Train pairs the run went through: steps x examples per step, at most the sample's epochs
    (train.max_minutes can stop a run before its last step)."""
    per_step = config.train.batch_size * config.train.grad_accum
    sample = config.data.max_train_examples
    return summary["steps"] * per_step if sample is None else min(summary["steps"] * per_step, int(sample * config.train.epochs))


def write_predictions(path: Path, mrs: list[str], outputs: list[str]) -> None:
    """A challenge-style TSV (MR<TAB>output), as the challenge's system outputs."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["MR", "output"])
    writer.writerows(zip(mrs, outputs))
    path.write_text(buffer.getvalue(), encoding="utf-8")


def table(rows: list[dict]) -> str:
    """The paper's layout, plus who scored each row, against which references, and sacreBLEU last."""
    digits = {"bleu": 1, "nist": 2, "meteor": 1, "rouge_l": 1, "cider": 2, "bleu_sacrebleu": 1}
    head = [header for _, header in COLUMNS]
    lines = [[_fmt(r.get(key), digits[key]) if key in digits else str(r[key]) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    return "\n".join(out + [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines])


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def decode_and_score(args, config, adapter_dir: str, out: Path) -> tuple[dict, list[dict]]:
    """Decode the test MRs with each decoding; score against both reference sets. Returns (details, rows)."""
    data = Path(args.data_dir)
    test = group_references(read_e2e_csv(data / "original" / "testset_w_refs.csv")).take(args.test_mrs)
    tokenised = aligned_references(test, read_lora_format(data / "lora_format" / "test.txt"), "lora_format/test.txt")
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model).to(default_device())
    rank = load_adapter(model, adapter_dir).r
    template = get_template(config.data.template, tokenizer)
    prompts = [template.render({"instruction": p, "output": ""})[0] for p in test.prompts]
    trainable = sum(t.numel() for t in read_adapter_weights(adapter_dir).values())
    total = sum(p.numel() for p in model.parameters())  # base + adapter, as PEFT's trainable% counts
    details = {"test_mrs": len(test), "test_references": sum(map(len, test.references)), "trainable_params": trainable,
               "trainable_percent": round(100 * trainable / total, 3), "total_params": total, "decodings": {}}
    rows = []
    coco = CocoScorers() if coco_unavailable() is None else None
    try:
        for name, generation in decodings(args).items():
            t0 = time.time()
            preds = generate(model, tokenizer, prompts, generation)
            seconds = round(time.time() - t0, 1)
            write_predictions(out / f"predictions-{name}.tsv", test.mrs, preds)
            scored = {OFFICIAL_REFS: score_challenge(preds, test.references, coco),
                      LORALIB_REFS: score_challenge(preds, tokenised, coco)}
            details["decodings"][name] = {"decode_seconds": seconds, "config": vars(generation),
                                          "predictions": str(out / f"predictions-{name}.tsv"), "scores": scored}
            for refs, scores in scored.items():
                rows.append({"method": f"{config.model} LoRA r={rank}, {name} (lorakit)", "trainable": f"{trainable / 1e6:.2f}M",
                             "scored_by": "lorakit.tasks.e2e", "references": refs,
                             **{m: scores[m] for m in (*METRICS, "bleu_sacrebleu")}})
    finally:
        if coco is not None:
            coco.close()
    return details, rows


def main() -> None:
    args, overrides = parse_args()
    config = load_run_config(args.config, overrides)
    config.train.overwrite_output_dir = True  # a bench run replaces its last one
    out = Path(config.train.output_dir)
    started = time.time()
    summary = run(config) if not args.adapter else {"adapter": args.adapter}
    out.mkdir(parents=True, exist_ok=True)
    details, ours = decode_and_score(args, config, summary["adapter"], out)
    paper = [{**row, "scored_by": "paper's authors", "references": LORALIB_REFS, "bleu_sacrebleu": None} for row in PAPER_ROWS]
    trained = None if args.adapter else {
        **{k: summary.get(k) for k in ("steps", "seconds", "eval", "best_checkpoint")},
        "sample": config.data.max_train_examples, "pairs_seen": pairs_seen(config, summary),
        "selection": "lowest eval loss on the dev subset (data.eval_file); the test set chose nothing"}
    record = {
        "bench": "e2e", "title": "E2E NLG: lorakit beside the LoRA paper's GPT-2 rows, under the E2E challenge scorer",
        "description": (f"{args.config} on {config.model}; "
                        + (f"adapter {args.adapter}; " if args.adapter else "the checkpoint with the lowest dev loss; ")
                        + f"{details['test_mrs']} test MRs decoded ({', '.join(details['decodings'])}) and scored by "
                        "the E2E challenge's rules against the official and against loralib's tokenised references."),
        "command": shlex.join(["python", *sys.argv]), **TREE_AT_START,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine(),
        "columns": [list(c) for c in COLUMNS], "runs": paper + ours,
        "notes": [f"paper rows: {PAPER_SCORER}.", f"lorakit rows: {SCORER} (lorakit.tasks.e2e).",
                  f"sacreBLEU*: {SACREBLEU_LABEL}, official references."],
        "model": config.model, "adapter": summary["adapter"], "train": trained, **details,
        "wall_seconds": round(time.time() - started, 1),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file
    print_report(args, record)


def print_report(args, record: dict) -> None:
    subset = "all 630" if args.test_mrs is None else f"the first {record['test_mrs']} of 630 (file order)"
    train = record["train"]
    trained = (f"trained {train['steps']} steps in {train['seconds']} s ({train['pairs_seen']:,d} pairs of a "
               f"{train['sample']:,d}-pair sample, checkpoint chosen on dev loss)" if train else f"adapter {record['adapter']}")
    print(f"\nE2E NLG test set: {subset} MRs, {record['test_references']} references; {trained}; trainable "
          f"{record['trainable_params']:,d} = {record['trainable_percent']}% of {record['total_params']:,d}")
    print(table(record["runs"]))
    print(f"paper rows: {PAPER_SCORER}.")
    print(f"lorakit rows: {SCORER} (lorakit.tasks.e2e; reproduces two challenge systems' official scores in its tests).")
    print(f"* {SACREBLEU_LABEL}, official references.")
    for name, decoding in record["decodings"].items():
        notes = {k: v for s in decoding["scores"].values() for k, v in s["notes"].items()}
        print(f"{name}: decoded in {decoding['decode_seconds']} s; outputs in {decoding['predictions']}"
              + (f"; n/a: {'; '.join(f'{k}: {v}' for k, v in notes.items())}" if notes else ""))
    print(f"wrote {args.out} ({record['wall_seconds']} s, {record['machine']['cores']} cores: {record['machine']['cpu']})")


if __name__ == "__main__":
    main()
