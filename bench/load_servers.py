"""The servers bench/serve_load.py drives, each a process on a free loopback port: `lorakit serve` with each
scheduler and setting asked for (lorakit_servers) and llama.cpp's llama-server on GGUF exports of the merged
adapter (llama_servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from results import ROOT

LLAMA_SERVER = Path.home() / ".cache" / "lorakit" / "llama.cpp-build" / "bin" / "llama-server"
KEY = "bench-key"


class Server:
    """A server process on a free loopback port, waited for until /health answers."""

    def __init__(self, name: str, argv: list[str], models: list[str], log_dir: Path, env: dict | None = None):
        self.name, self.models = name, models
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(log_dir / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait(self, seconds: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer /health within {seconds:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lorakit_servers(args, root: Path, names: list[str], log_dir: Path) -> list[Server]:
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    servers = []
    for scheduler in args.schedulers.split(","):
        argv = [sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--port", "{port}",
                "--api-key", KEY, "--scheduler", scheduler, "--max-batch", str(args.max_batch),
                *(f"--adapter={n}={root / n}" for n in names)]  # fmt: skip
        servers.append(Server(f"lorakit-{scheduler}", argv, names, log_dir, env))
        if scheduler == "continuous" and args.prefill_apart:
            servers.append(Server("lorakit-continuous-apart", [*argv, "--prefill", "apart"], names, log_dir, env))
        if scheduler == "continuous" and args.half_weights:
            servers.append(Server("lorakit-continuous-half", [*argv, "--half-weights", args.half_weights], names,
                                  log_dir, env))
        if scheduler == "continuous" and args.quantize:
            servers.append(Server(f"lorakit-continuous-{args.quantize}", [*argv, "--quantize", args.quantize], names,
                                  log_dir, env))
        if scheduler == "continuous" and args.lora_dtype:
            narrow = [*argv, "--lora-dtype", args.lora_dtype]
            servers.append(Server(f"lorakit-continuous-lora-{args.lora_dtype}", narrow, names, log_dir, env))
            if args.quantize:
                servers.append(Server(f"lorakit-continuous-{args.quantize}-lora-{args.lora_dtype}",
                                      [*narrow, "--quantize", args.quantize], names, log_dir, env))
    return servers


def llama_servers(args, root: Path, names: list[str], log_dir: Path) -> list[Server]:
    """llama-server on the base with names[0] merged, one per GGUF type (exported by `lorakit export`)."""
    binary = Path(args.llama_server) if args.llama_server else None
    if binary is None or not binary.is_file():
        print(f"  llama-server not found at {args.llama_server!r}: llama.cpp left out", flush=True)
        return []
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    servers = []
    for kind in args.gguf.split(","):
        gguf = root / f"merged-{kind}.gguf"
        subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", args.model, "--adapter",
                        str(root / names[0]), "--outtype", kind, "--output", str(gguf)],
                       check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)  # fmt: skip
        slots, per_slot = args.max_batch, 1024
        argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}", "--api-key", KEY,
                "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * per_slot),
                "--threads-http", str(args.requests + 4)]  # a connection each, as lorakit's server takes them
        servers.append(Server(f"llama-{kind}", argv, ["merged"], log_dir))  # fmt: skip
    return servers
