"""`lorakit serve --model M --adapter NAME=DIR ... [--host H --port P --api-key KEY --max-batch N]`"""

from __future__ import annotations

import argparse
import os

from lorakit.cli.parsing import non_empty, subcommand
from lorakit.serve.config import HALF_WEIGHTS, LORA_DTYPES, PREFILLS, QUANTIZE, SCHEDULERS, ServeConfig

EXAMPLES = """examples:
  lorakit serve --model smollm2-135m-instruct --adapter ros2=runs/ros2-demo/adapter
  lorakit serve --model smollm2-135m-instruct --adapter a=runs/a/adapter --adapter b=runs/b/adapter \\
      --api-key "$KEY" --adapters-root runs --max-batch 16     # hot loading from under runs/

  then, with any OpenAI client:
  curl http://127.0.0.1:8000/v1/completions -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
      -d '{"model": "ros2", "prompt": "### Instruction:\\nTurn left\\n\\n### Command:\\n", "max_tokens": 32, "temperature": 0}'
"""

FLAGS = [
    "host",
    "port",
    "served_model_name",
    "api_key",
    "adapters_root",
    "scheduler",
    "prefill",
    "half_weights",
    "quantize",
    "lora_dtype",
    "max_batch",
    "max_kv_tokens",
    "batch_wait_ms",
    "max_prompt_tokens",
    "max_tokens",
    "max_body_bytes",
]


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "serve",
        help="serve a base model and many adapters over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions (stream: true gives server-sent events) "
        "and /v1/models; the request's 'model' picks the adapter (or the base). Requests join the running "
        "batch at the next decode step (continuous batching), each row with its own adapter. POST /v1/adapters {name, path} and "
        "DELETE /v1/adapters/NAME load and unload adapters (needs --api-key; paths inside --adapters-root).",
        examples=EXAMPLES,
    )
    parser.add_argument("--model", type=non_empty, required=True, help="built-in name, folder, .gguf file or Hub id")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as NAME (repeatable)",
    )
    defaults = ServeConfig()
    for name in FLAGS:
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        choices = {"scheduler": SCHEDULERS, "prefill": PREFILLS, "half_weights": HALF_WEIGHTS,
                   "quantize": QUANTIZE, "lora_dtype": LORA_DTYPES}.get(name)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, choices=choices, help=ServeConfig.help_of(name)
        )
    parser.set_defaults(run=run)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=DIR pairs; a bare DIR is named after its folder."""
    from lorakit.config import ConfigError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (os.path.basename(os.path.normpath(spec)), spec)
        if not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise ConfigError(f"--adapter {spec!r}: the name '{name}' is given twice")
        out[name] = path
    return out


def run(args: argparse.Namespace, _overrides) -> int:
    from lorakit.cli.listening import listening_socket, serve_on
    from lorakit.config import ConfigError
    from lorakit.serve.app import build_app
    from lorakit.serve.registry import RegistryError

    settings = {name: getattr(args, name) for name in FLAGS}
    # the environment keeps the key out of `ps`; an empty key (an unset variable expanded) is an error, never "none"
    settings["api_key"] = args.api_key if args.api_key is not None else os.environ.get("LORAKIT_API_KEY")
    if settings["api_key"] is not None and not settings["api_key"].strip():
        source = "--api-key" if args.api_key is not None else "$LORAKIT_API_KEY"
        raise ConfigError(f"{source}: empty; give the key clients must send, or leave {source} out for none")
    config = ServeConfig(**settings)
    try:
        app = build_app(args.model, parse_adapters(args.adapter), config)
    except RegistryError as err:
        raise ConfigError(f"--adapter: {err}") from None
    sock = listening_socket(config.host, config.port)
    print(
        f"lorakit serve: {args.model} with adapters {', '.join(app.state.registry.names()) or 'none'} "
        f"on http://{config.host}:{sock.getsockname()[1]}/v1",
        flush=True,
    )
    return serve_on(app, sock, "info" if args.verbose else "warning")
