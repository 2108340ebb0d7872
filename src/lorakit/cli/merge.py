"""`lorakit merge --model M --adapter DIR --output DIR`"""

from __future__ import annotations

from lorakit.cli.parsing import subcommand

EXAMPLES = """examples:
  lorakit merge --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter --output runs/ros2-merged
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "merge",
        help="fold an adapter into its base and save a plain model",
        description="Merge the adapter into the base weights and save a plain transformers model "
        "(loadable with from_pretrained, no lorakit or PEFT needed).",
        examples=EXAMPLES,
    )
    parser.add_argument("--model", required=True, help="the adapter's base: built-in name, folder, .gguf or Hub id")
    parser.add_argument("--adapter", required=True, help="a PEFT-format adapter folder")
    parser.add_argument("--output", required=True, help="folder for the merged model and its tokenizer")
    parser.set_defaults(run=run)


def run(args, _overrides) -> int:
    from lorakit.checkpoint.peft_io import load_adapter
    from lorakit.lora.merge import merge_and_unload
    from lorakit.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(args.model)
    load_adapter(model, args.adapter)
    merged = merge_and_unload(model)
    merged.save_pretrained(args.output)
    load_tokenizer(args.model).save_pretrained(args.output)
    print(f"merged model written to {args.output}")
    return 0
