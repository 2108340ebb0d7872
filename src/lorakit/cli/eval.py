"""`lorakit eval --model M [--adapter DIR] --data FILE [--task ros2]`"""

from __future__ import annotations

import json

from lorakit.cli.generate import add_model_arguments, load_for_inference
from lorakit.cli.parsing import subcommand
from lorakit.tasks import TASKS

EXAMPLES = """examples:
  lorakit eval --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter --data runs/ros2-data/test.jsonl --task ros2
  lorakit eval --model smollm2-135m-instruct --data runs/ros2-data/test.jsonl --template seed --task ros2   # the base alone
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "eval",
        help="score generations against references (exact match, task validity)",
        description="Greedy-generate a response for every record of --data and score it against its reference.",
        examples=EXAMPLES,
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL/JSON/CSV file of instruction/output records")
    parser.add_argument("--task", choices=list(TASKS), help="task scorer (default: exact match only)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(run=run)


def run(args, _overrides) -> int:
    from lorakit.config import EvalConfig
    from lorakit.data.files import load_records
    from lorakit.data.formats import validate_records
    from lorakit.infer.score import score_generations
    from lorakit.checkpoint.run_card import read_run_card

    model, tokenizer, template = load_for_inference(args)
    records = load_records(args.data)
    validate_records(records, None, args.data)
    task = args.task or read_run_card(args.adapter).get("task")
    config = EvalConfig(task=task, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=3)
    scores = score_generations(model, tokenizer, records, template, config)
    print(json.dumps(scores, indent=1, ensure_ascii=False))
    return 0
