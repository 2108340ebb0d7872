"""`lorakit export --model M [--adapter DIR] --format gguf|gguf-lora --outtype f32|f16|q8_0 [--output FILE]`"""

from __future__ import annotations

from lorakit.cli.parsing import subcommand

EXAMPLES = """examples:
  lorakit export --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter --outtype f16 \\
      --output runs/ros2-f16.gguf --ollama       # merged model for llama.cpp, plus an Ollama Modelfile
  ollama create ros2 -f runs/Modelfile          # then: ollama run ros2 "Move forward at 0.5 m/s"
  lorakit export --adapter runs/ros2-demo/adapter --format gguf-lora --outtype f32 --output runs/ros2-lora.gguf
  lorakit export --model smollm2-135m-instruct --outtype f32 --output runs/base-f32.gguf   # the base alone
"""


def add_parser(commands) -> None:
    from lorakit.export.formats import ExportConfig

    help_of = {f.name: f.metadata["help"] for f in ExportConfig.__dataclass_fields__.values()}
    parser = subcommand(
        commands,
        "export",
        help="write a GGUF file for llama.cpp / Ollama (merged model or LoRA adapter)",
        description="Export to GGUF in pure Python: --format gguf merges the adapter into the base and writes "
        "one file (tensors under llama.cpp's names, the tokenizer, the chat template and the adapter's prompt "
        "template); --format gguf-lora writes llama.cpp's LoRA adapter file. Files are written under a "
        "temporary name and renamed at the end.",
        examples=EXAMPLES,
    )
    for name in ("model", "adapter", "format", "outtype", "output", "template"):
        parser.add_argument(f"--{name}", help=help_of[name])
    parser.add_argument("--force", action="store_true", help=help_of["force"])
    parser.add_argument("--ollama", action="store_true", help=help_of["ollama"])
    parser.set_defaults(run=run, format="gguf", outtype="f16")


def run(args, _overrides) -> int:
    from lorakit.cli.failures import sigterm_as_interrupt
    from lorakit.export import ExportConfig, export

    config = ExportConfig(
        model=args.model, adapter=args.adapter, format=args.format, outtype=args.outtype, output=args.output,
        force=args.force, ollama=args.ollama, template=args.template,
    )
    with sigterm_as_interrupt():  # a stopped export removes its half-written file, as Ctrl-C does
        result = export(config)
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {config.format} {config.outtype}) "
          f"in {result.seconds:.1f} s")
    if result.modelfile:
        print(f"wrote {result.modelfile}; load it with: ollama create NAME -f {result.modelfile}")
    return 0
