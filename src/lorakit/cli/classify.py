"""`lorakit classify --model M --adapter DIR (--text T | --input IN.jsonl --output OUT.jsonl | --demo | --interactive)`"""

from __future__ import annotations

import json
import sys

from lorakit.cli.parsing import non_empty, subcommand
from lorakit.infer.load import load_classifier

EXAMPLES = """examples:
  lorakit classify --model minilm-l6 --adapter runs/sst2/adapter --text "a gorgeous, witty, seductive movie"
  lorakit classify --model minilm-l6 --adapter runs/sst2/adapter --input reviews.jsonl --output labelled.jsonl
  lorakit classify --model minilm-l6 --adapter runs/sst2/adapter --demo
  printf 'great film\\nawful plot\\n' | lorakit classify --model minilm-l6 --adapter runs/sst2/adapter --interactive
"""
DEMO_TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "it 's a charming and often affecting journey .",
    "a dull , lifeless and overlong mess .",
    "not as good as the original , but still worth a look .",
]


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "classify",
        help="label texts with a classification adapter, with confidences",
        description="Print each text's label and its probability. --interactive reads lines until EOF.",
        examples=EXAMPLES,
    )
    parser.add_argument("--model", type=non_empty,
                        required=True, help="the adapter's base: built-in name, folder or Hub id")
    parser.add_argument("--adapter", type=non_empty,
                        required=True, help="a PEFT-format SEQ_CLS adapter folder (with its head)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--text", type=non_empty, help="one text")
    mode.add_argument("--input", type=non_empty,
                      help="JSONL of {\"text\": ...} records; written back with label and probability")
    mode.add_argument("--demo", action="store_true", help="classify a few built-in example sentences")
    mode.add_argument("--interactive", action="store_true", help="read texts line by line from standard input")
    parser.add_argument("--output", type=non_empty, help="JSONL file for --input")
    parser.add_argument("--force", action="store_true", help="replace an existing --output file")
    parser.add_argument("--text-field", default="text", help="field of --input records holding the text")
    parser.set_defaults(run=run)


def run(args, _overrides) -> int:
    from lorakit.data.files import load_records
    from lorakit.data.formats import DataError, public_fields
    from lorakit.atomic_files import write_atomically
    from lorakit.infer.classify import classify
    from lorakit.output_folders import check_new_file

    if args.input and args.output is None:
        raise DataError("--input needs --output (the JSONL file to write)")
    if args.input:  # before the model loads
        check_new_file(args.output, "--output", [args.input], args.force)
    model, tokenizer, labels, max_length = load_classifier(args.model, args.adapter)

    def label(texts: list[str]) -> list[dict]:
        return classify(model, tokenizer, texts, labels, max_length)

    if args.interactive:
        return _interactive(label)
    if args.input:
        records = load_records(args.input)
        for record in records:
            if not isinstance(record.get(args.text_field), str) or not record[args.text_field].strip():
                raise DataError(f"{args.input}:{record.get('_line')}: field '{args.text_field}' is missing or empty")
        results = label([r[args.text_field] for r in records])
        lines = [
            json.dumps({**public_fields(r), "label": o["label"],
                        "probability": round(o["probability"], 6)}, ensure_ascii=False)
            for r, o in zip(records, results)
        ]
        write_atomically(args.output, "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} records to {args.output}")
        return 0
    texts = DEMO_TEXTS if args.demo else [args.text]
    for text, result in zip(texts, label(texts)):
        print(f"{result['label']}\t{result['probability']:.4f}\t{text}")
    return 0


def _interactive(label) -> int:
    """One answer per non-empty line; empty lines are skipped; stops cleanly at EOF or Ctrl-C."""
    if sys.stdin.isatty():
        print("type a text and press enter; Ctrl-D ends", file=sys.stderr)
    try:
        for line in sys.stdin:
            text = line.strip()
            if not text:
                continue
            result = label([text])[0]
            print(f"{result['label']}\t{result['probability']:.4f}\t{text}", flush=True)
    except KeyboardInterrupt:
        pass
    return 0
