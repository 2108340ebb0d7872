"""`lorakit dashboard [RUNS_DIR] [--host H --port P --api-key KEY]`"""

from __future__ import annotations

import argparse
import os
import sys

from lorakit.cli.parsing import subcommand
from lorakit.dashboard.config import DashboardConfig

EXAMPLES = """examples:
  lorakit dashboard                      # the runs under ./runs, on http://127.0.0.1:7860
  lorakit dashboard runs/sweep --port 7861
  LORAKIT_API_KEY=... lorakit dashboard runs --host 0.0.0.0    # reachable from other machines, with a key
"""

FLAGS = ["host", "port", "api_key", "poll_seconds"]


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "dashboard",
        help="a local web page showing and comparing the runs in a folder",
        description="Serve one page listing the runs under RUNS_DIR (status, model, settings, best metric, "
        "tokens/s), each run's curves (live while it trains), settings (with the differences to another run), "
        "samples (base vs adapter, with the scorer's verdict), and a comparison of 2-3 adapters on the same "
        "held-out prompts. Read-only.",
        examples=EXAMPLES,
    )
    parser.add_argument("runs_dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    defaults = DashboardConfig()
    for name in FLAGS:
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default,
                            help=DashboardConfig.help_of(name))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, _overrides) -> int:
    from lorakit.cli.listening import listening_socket, serve_on
    from lorakit.config import ConfigError
    from lorakit.dashboard.app import build_app

    settings = {name: getattr(args, name) for name in FLAGS}
    settings["api_key"] = args.api_key or os.environ.get("LORAKIT_API_KEY")  # keeps the key out of `ps`
    config = DashboardConfig(**settings)
    if not os.path.isdir(args.runs_dir):
        raise ConfigError(f"{args.runs_dir}: no such folder; expected a folder of run folders (train.output_dir)")
    try:
        os.listdir(args.runs_dir)
    except OSError as err:  # the page would list nothing and say nothing of why
        raise ConfigError(f"{args.runs_dir}: cannot be read ({err.strerror}); expected a readable folder of run folders") from None
    app = build_app(args.runs_dir, config)
    sock = listening_socket(config.host, config.port)  # before the warning: a host it cannot take is the one line
    if not config.loopback:
        print(f"lorakit dashboard: warning: listening on {config.host}: anyone who can reach this machine and has the "
              "key can read these runs; the connection is plain HTTP (put TLS in front for untrusted networks)",
              file=sys.stderr)
    shown = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    key = "/?key=<your key>" if config.api_key else "/"
    print(f"lorakit dashboard: {app.state.root} on http://{shown}:{sock.getsockname()[1]}{key}", flush=True)
    return serve_on(app, sock, "info" if args.verbose else "warning")
