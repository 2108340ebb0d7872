"""`lorakit eval --model M [--adapter DIR] --data FILE [--task ros2]`, or
`lorakit eval --task e2e --predictions OUT.tsv [--references REFS.csv] [--json]`"""

from __future__ import annotations

import json
import sys

from lorakit.cli.generate import add_model_arguments, load_for_inference
from lorakit.cli.parsing import non_empty, positive_int, subcommand
from lorakit.data.formats import FORMATS
from lorakit.tasks import TASKS

EXAMPLES = """examples:
  lorakit eval --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter --data runs/ros2-data/test.jsonl --task ros2
  lorakit eval --model smollm2-135m-instruct --data runs/ros2-data/test.jsonl --template seed --task ros2   # the base alone
  lorakit eval --task e2e --predictions outputs.tsv       # E2E challenge scores against the official test set
  lorakit eval --task e2e --predictions outputs.tsv --references devset.csv --json
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "eval",
        help="score generations against references (exact match, task scores, the E2E challenge's metrics)",
        description="Greedy-generate a response for every record of --data and score it against its reference; "
        "or, with --predictions, score a system's saved E2E outputs (MR<TAB>output) by the E2E NLG Challenge's "
        "rules: BLEU, NIST, METEOR, ROUGE-L, CIDEr.",
        examples=EXAMPLES,
    )
    add_model_arguments(parser, model_required=False)
    parser.add_argument("--data", type=non_empty,
                        help="JSONL/JSON/CSV file of instruction/output records (with --model)")
    parser.add_argument("--format", choices=list(FORMATS), help="the --data file's record format, as data.format "
                        "(default: told from its fields; e2e reads the challenge's mr,ref CSVs)")
    parser.add_argument("--task", choices=list(TASKS),
                        help="task scorer (default: the adapter run card's task, else exact match only)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    saved = parser.add_argument_group("scoring saved E2E outputs (--task e2e)")
    saved.add_argument("--predictions", help="TSV with the header MR<TAB>output, one line per meaning representation")
    saved.add_argument("--references", help="E2E CSV (mr,ref) with every reference of each MR; "
                       "default: the official test set, ../shared/data/e2e/original/testset_w_refs.csv")
    saved.add_argument("--json", action="store_true", help="print the scores as JSON")
    saved.add_argument("--allow-subset", action="store_true",
                       help="score outputs for only some of the references' MRs (else refused: a cut file)")
    parser.set_defaults(run=run, parser=parser)


def run(args, _overrides) -> int:
    if args.predictions or args.references:
        return run_saved(args)
    if not args.model or not args.data:
        args.parser.error("--model and --data are required (or --task e2e --predictions FILE to score saved outputs)")
    from lorakit.config import EvalConfig
    from lorakit.data.dataset import file_reader
    from lorakit.data.formats import validate_records
    from lorakit.infer.score import score_generations
    from lorakit.checkpoint.run_card import read_run_card

    read, fmt = file_reader(args.format)
    records = read(args.data)  # before the model loads: a bad file is named at once
    validate_records(records, fmt, args.data)
    model, tokenizer, template = load_for_inference(args)
    task = args.task or read_run_card(args.adapter).get("task")
    config = EvalConfig(task=task, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=3)
    scores = score_generations(model, tokenizer, records, template, config)
    print(json.dumps(scores, indent=1, ensure_ascii=False))
    return 0


def run_saved(args) -> int:
    """Score a saved E2E output file; the library reads, checks and scores, this prints."""
    if args.task != "e2e" or not args.predictions:
        args.parser.error("--predictions/--references score saved E2E outputs: give --task e2e --predictions FILE")
    if args.model or args.data:
        args.parser.error("--predictions scores saved outputs: drop --model/--data (or drop --predictions to generate)")
    from lorakit.tasks.e2e import LABELS, METRICS, SACREBLEU_LABEL, SCORER, score_files

    scores = score_files(args.predictions, args.references, allow_subset=args.allow_subset)
    if args.json:
        print(json.dumps({"scorer": SCORER, **scores}, indent=1, ensure_ascii=False))
        return 0
    print(f"{scores['predictions']}: {scores['mrs']} of the {scores['reference_mrs']} MRs of {scores['references_file']}, "
          f"{scores['references']:,d} references")
    print(f"scorer: {SCORER}")
    digits = {"bleu": 2, "nist": 4, "meteor": 2, "rouge_l": 2, "cider": 4}
    for metric in METRICS:
        value = scores[metric]
        shown = f"{value:.{digits[metric]}f}" if value is not None else f"n/a ({scores['notes'][metric]})"
        print(f"  {LABELS[metric]:<8} {shown}")
    print(f"  {SACREBLEU_LABEL}: {scores['bleu_sacrebleu']:.2f}")
    if scores["mrs"] < scores["reference_mrs"]:
        print(f"note: {scores['reference_mrs'] - scores['mrs']} MRs of the references have no output; "
              "the scores cover the given outputs only", file=sys.stderr)
    return 0
