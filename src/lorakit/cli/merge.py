"""`lorakit merge --model M --adapter DIR --output DIR [--load-in-4bit [--base-full-precision]]`"""

from __future__ import annotations

from lorakit.cli.parsing import add_quantization_flags, non_empty, subcommand

EXAMPLES = """examples:
  lorakit merge --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter --output runs/ros2-merged
  lorakit merge --model smollm2-135m-instruct --adapter runs/ros2-qlora/adapter --output runs/ros2-qlora-merged \\
      --load-in-4bit                          # dequantise the NF4 base, merge in fp32, report the logit gap
  lorakit merge ... --load-in-4bit --base-full-precision   # merge into the original fp32 base instead
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "merge",
        help="fold an adapter into its base and save a plain model",
        description="Merge the adapter into the base weights and save a plain transformers model "
        "(loadable with from_pretrained, no lorakit or PEFT needed). With --load-in-4bit/8bit the "
        "adapter is applied to the quantised base it was trained on; the base is dequantised, the "
        "adapter merged in fp32, and the logit gap to the adapter-on-quantised-base is reported.",
        examples=EXAMPLES,
    )
    parser.add_argument("--model", type=non_empty,
                        required=True, help="the adapter's base: built-in name, folder, .gguf or Hub id")
    parser.add_argument("--adapter", type=non_empty, required=True, help="a PEFT-format adapter folder")
    parser.add_argument("--output", type=non_empty, required=True,
                        help="a new (or empty) folder for the merged model and its tokenizer")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output folder (never the base's)")
    add_quantization_flags(parser)
    parser.add_argument(
        "--base-full-precision", action="store_true",
        help="with --load-in-4bit/8bit: merge into the original full-precision base instead of the dequantised "
        "one (and report that gap too)",
    )
    parser.set_defaults(run=run)


def run(args, _overrides) -> int:
    import shutil
    import sys

    from lorakit.config import ConfigError
    import torch

    from lorakit.infer.load import load_merged
    from lorakit.models import stored_dtype
    from lorakit.output_folders import check_new_folder, move_into_place, staging_folder
    from lorakit.quant.merge import GAP_PROMPTS

    if args.base_full_precision and not args.bits:
        raise ConfigError("--base-full-precision compares against a quantised base: add --load-in-4bit or --load-in-8bit")
    output = check_new_folder(args.output, "--output", [args.model, args.adapter], args.force)
    merged, tokenizer, gaps, note = load_merged(args.model, args.adapter, args.bits, args.base_full_precision)
    stored = stored_dtype(args.model)
    if stored != torch.float32:  # merged in fp32; saved as the base is stored (as PEFT's merge keeps the base's type)
        merged.to(stored)
        merged.config.dtype = stored
        saved = f"the merged model is saved in {str(stored).removeprefix('torch.')}, as the base is stored"
        note = f"{note}; {saved}" if note else saved
    if note:
        print(f"note: {note}", file=sys.stderr)
    if gaps:
        print(f"logits on {len(GAP_PROMPTS)} prompts, against the adapter on the {args.bits}-bit base:")
        for gap in gaps:
            print(f"  {gap.line()}")
    staging = staging_folder(output)
    try:  # written whole beside the output, then put in its place: never half a model under its name
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        move_into_place(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged model written to {output}")
    return 0
