"""`lorakit generate --model M [--adapter DIR] (--prompt TEXT | --input IN.jsonl --output OUT.jsonl)`"""

from __future__ import annotations

import json

from lorakit.cli.parsing import add_quantization_flags, non_empty, positive_int, subcommand, temperature, top_p
from lorakit.serve.config import LORA_DTYPES, QUANTIZE

EXAMPLES = """examples:
  lorakit generate --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter --prompt "Move forward at 0.5 m/s"
  lorakit generate --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter \\
      --input instructions.jsonl --output commands.jsonl      # one batch per --batch-size lines
  lorakit generate --model smollm2-135m-instruct --template chat --prompt "What is the capital of France?"
  lorakit generate --model smollm2-135m-instruct --adapter runs/ros2-chat/adapter --chat \\
      --input conversations.jsonl --output replies.jsonl   # {"messages": [...]} lines: the next assistant reply
  lorakit generate --model Qwen/Qwen2.5-7B-Instruct --device-map auto --prompt "..."   # layers over all GPUs
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "generate",
        help="generate with a base model and optionally an adapter",
        description="Generate responses. Instructions are wrapped in the adapter's prompt template "
        "(or --template); batch mode reads {\"instruction\": ...} lines and writes them back with \"output\". "
        "With --chat, --prompt is one user message and --input holds conversations ({\"messages\": [...]} or "
        "ShareGPT {\"conversations\": [...]}), rendered with the tokenizer's chat template exactly as "
        "training and `lorakit serve` render them; the reply to the last user turn is generated (a trailing "
        "assistant turn is taken as the reference and left out).",
        examples=EXAMPLES,
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", type=non_empty, help="one instruction")
    source.add_argument("--input", type=non_empty,
                        help="JSONL file of {\"instruction\": ...} records (with --chat: conversations)")
    parser.add_argument("--chat", action="store_true", help="chat mode: render conversations with the chat template")
    parser.add_argument("--output", type=non_empty, help="where batch mode writes its JSONL (required with --input)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output file")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=top_p, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="prompts per batch (left-padded)")
    parser.set_defaults(run=run)


def add_model_arguments(parser, model_required: bool = True) -> None:
    parser.add_argument("--model", type=non_empty,
                        required=model_required, help="built-in name, folder, .gguf file or Hub id")
    parser.add_argument("--adapter", type=non_empty, help="a PEFT-format adapter folder")
    parser.add_argument(
        "--template", help="seed, alpaca, chat, raw, or a format string with {instruction}; default: the adapter's"
    )
    parser.add_argument(
        "--device-map", help="'auto' spreads the base over all GPUs (accelerate's device_map); default: one device"
    )
    add_quantization_flags(parser)
    parser.add_argument(
        "--quantize", choices=QUANTIZE, default="off",
        help="int8: the base's linear weights and head stored as int8 on a CPU, as `lorakit serve --quantize int8` "
        "serves them (weight-only, one scale per output channel; the adapter stays fp32); w8a8: the same, the "
        "products' inputs rounded to int8 too, as `lorakit serve --quantize w8a8`",
    )
    parser.add_argument(
        "--lora-dtype", choices=LORA_DTYPES, default="fp32",
        help="bf16: the adapter's factors rounded to bf16 values; int8: each rank of them to int8 values times a "
        "power of two; as `lorakit serve --lora-dtype` serves them (to score a task on them before serving)",
    )


def load_for_inference(args):
    """(model, tokenizer, template) for --model/--adapter/--template/--load-in-*; prints the library's note."""
    import sys

    from lorakit.infer.load import load_for_inference as load

    model, tokenizer, template, note = load(
        args.model, args.adapter, args.template, args.bits, getattr(args, "device_map", None), args.quantize,
        args.lora_dtype,
    )
    if note:
        print(f"note: {note}", file=sys.stderr)
    return model, tokenizer, template


def run(args, _overrides) -> int:
    from lorakit.data.chat import chat_prompt_messages, render_prompt
    from lorakit.data.files import load_records
    from lorakit.data.formats import DataError, public_fields, where
    from lorakit.infer.generate import GenerationConfig, generate
    from lorakit.atomic_files import write_atomically
    from lorakit.output_folders import check_new_file

    if args.input and args.output is None:
        raise DataError("--input needs --output (the JSONL file to write)")
    if args.prompt is not None and args.output is not None:
        raise DataError("--output goes with --input; a --prompt's completion is printed")
    if args.input:  # before the model loads
        check_new_file(args.output, "--output", [args.input], args.force)
    model, tokenizer, template = load_for_inference(args)
    if args.chat:
        records = [{"messages": [{"role": "user", "content": args.prompt}]}] if args.prompt else load_records(args.input)
        prompts = [render_prompt(tokenizer, chat_prompt_messages(r), where(r) if args.input else "--prompt")
                   for r in records]
    else:
        records = [{"instruction": args.prompt}] if args.prompt else load_records(args.input)
        for record in records:
            instruction, line = record.get("instruction"), f"{args.input}:{record.get('_line', '?')}"
            if not isinstance(instruction, str):
                raise DataError(f"{line}: field 'instruction' is missing (expected a string)")
            if not instruction.strip():
                raise DataError(f"{line}: field 'instruction' is empty (expected the instruction's text)")
        prompts = [template.render({**public_fields(r), "output": ""})[0] for r in records]
    in_prompt = args.chat or getattr(template, "special_tokens_in_prompt", False)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        batch_size=args.batch_size, add_special_tokens=not in_prompt,
    )
    outputs = generate(model, tokenizer, prompts, config)
    if args.prompt:
        print(outputs[0])
        return 0
    lines = [json.dumps({**public_fields(r), "output": o}, ensure_ascii=False) for r, o in zip(records, outputs)]
    write_atomically(args.output, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} records to {args.output}")
    return 0
