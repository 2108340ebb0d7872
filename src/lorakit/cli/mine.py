"""`lorakit mine-preferences --model M --adapter DIR --data train.jsonl --output prefs.jsonl`"""

from __future__ import annotations

from lorakit.cli.generate import add_model_arguments, load_for_inference
from lorakit.cli.parsing import non_empty, positive_int, subcommand

EXAMPLES = """examples:
  lorakit mine-preferences --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter \\
      --data runs/ros2-data/train.jsonl --task ros2 --samples 4 --temperature 1.0 --output runs/ros2-data/prefs.jsonl
  lorakit train examples/ros2/dpo.yaml      # DPO from the SFT adapter on those pairs
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "mine-preferences",
        help="sample an adapter on its training prompts and keep its mistakes as preference pairs",
        description="For each prompt of --data (instruction records, or every assistant turn of a conversation), "
        "sample --samples replies, score each with --task's scorer against the reference, and keep "
        "{prompt, chosen: the reference, rejected: the most frequent wrong reply} where one was wrong. "
        "Prompts are rendered with the adapter's template (or --template) as `lorakit generate` renders them. "
        "The output is written whole or not at all; the pairs train with task dpo or orpo.",
        examples=EXAMPLES,
    )
    add_model_arguments(parser)
    parser.add_argument("--data", type=non_empty,
                        required=True, help="JSONL/JSON/CSV of instruction records or conversations")
    parser.add_argument("--task", help="scorer that says right or wrong (lorakit.tasks, e.g. ros2); default: "
                        "exact match after stripping")
    parser.add_argument("--samples", type=positive_int, default=4, help="replies sampled per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="sequences per generation batch")
    parser.add_argument("--max-records", type=positive_int, help="mine only the first N records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=non_empty, required=True, help="the JSONL file of pairs to write")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run)


def run(args, _overrides) -> int:
    import time

    from lorakit.config import ConfigError
    from lorakit.data.files import load_records
    from lorakit.data.formats import DataError
    from lorakit.infer.mine import MineConfig, check_records, mine_preferences, write_pairs
    from lorakit.output_folders import check_new_file
    from lorakit.tasks import TASKS

    config = MineConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    problems = config.problems()
    if args.task is not None and args.task not in TASKS:
        problems.append(f"--task: given {args.task!r}, expected one of {', '.join(TASKS)}")
    if problems:
        raise ConfigError("; ".join(problems))
    check_new_file(args.output, "--output", [args.data], args.force)
    records = load_records(args.data)
    if not records:
        raise DataError(f"{args.data}: no records; expected instruction records or conversations")
    records = records[: args.max_records] if args.max_records else records
    check_records(records)  # before the model loads
    started = time.time()
    model, tokenizer, template = load_for_inference(args)
    mined = mine_preferences(model, tokenizer, records, template, args.task, config)
    write_pairs(args.output, mined.pairs, force=args.force)
    print(f"{mined.line()}; wrote {args.output} in {time.time() - started:.0f} s")
    return 0
