"""The server's settings and limits, each with its help text (the CLI flags are made from them)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from lorakit.config import ConfigError, _help

SCHEDULERS = ("continuous", "batch")  # serve/continuous.py, serve/scheduler.py
HALF_WEIGHTS = ("off", "auto", "fp16", "bf16")  # infer/half_weights.py
PREFILLS = ("beside", "apart")  # infer/continuous.py: RunningBatch
QUANTIZE = ("off", "int8", "w8a8")  # infer/int8_weights.py
LORA_DTYPES = ("fp32", "bf16", "int8")  # lora/adapters.py's LORA_DTYPES, named here without importing torch


MAX_BATCH_WAIT_MS = 60_000


@dataclass
class ServeConfig:
    host: str = _help("address to listen on; 127.0.0.1 keeps the server on this machine", default="127.0.0.1")
    port: int = _help("TCP port (0: any free port)", default=8000)
    served_model_name: str | None = _help(
        "the base model's name in the API (default: the --model value)", default=None
    )
    api_key: str | None = _help(
        "clients must send 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY); without a key, "
        "adapters cannot be loaded or unloaded",
        default=None,
    )
    adapters_root: str | None = _help(
        "folder that POST /v1/adapters may load from (paths are resolved, symlinks too, and must stay inside)",
        default=None,
    )
    scheduler: str = _help(
        "continuous: requests join the running batch at the next decode step and leave when done; "
        "batch: the waiting requests run together to the end, then the next ones",
        default="continuous",
    )
    prefill: str = _help(
        "continuous scheduler: beside (a joining request's prompt is prefilled in the same pass as the running "
        "rows' next decode step, where the model decodes through lorakit's own step) | apart (in a forward pass "
        "of its own, the running rows waiting)",
        default="beside",
    )
    half_weights: str = _help(
        "the base model's linear weights in a half type on a CPU, adapters, embeddings, head and KV cache in fp32: "
        "off | auto (only where this CPU multiplies halves faster, e.g. AMX's bf16) | fp16 | bf16; outputs are "
        "then close to the fp32 model's, not equal",
        default="off",
    )
    quantize: str = _help(
        "int8: the base model's linear weights, the head's too, stored as int8 with one scale per output channel "
        "on a CPU (weight-only, a quarter of fp32's bytes; the products take bf16 inputs and accumulate in fp32); "
        "w8a8: the same weights, and each product rounds its inputs to int8 per block of 32 (as llama.cpp's q8_0) "
        "and multiplies in int8 (AVX-512 VNNI where the CPU has it); "
        "adapters, embeddings, norms and KV cache stay fp32; outputs are close to the fp32 model's, not equal; "
        "not together with --half-weights",
        default="off",
    )
    lora_dtype: str = _help(
        "fp32 | bf16 | int8: every loaded adapter's factors rounded to bf16 (as an adapter trained or saved in bf16 "
        "holds them), or each rank of them (a row of A, a column of B) to int8 values times a power of two, so that "
        "a mixed batch reads them at half (bf16) or a quarter (int8) of the bytes; products and sums stay fp32; "
        "outputs are then close to the fp32 adapter's, not equal. bf16 needs a scaling (lora_alpha / r) that is a "
        "power of two for the scaled B to stay a bf16 value; factors that are such values already are read that way "
        "anyway",
        default="fp32",
    )
    max_batch: int = _help("most requests decoding together in one batch", default=16)
    max_kv_tokens: int = _help(
        "continuous scheduler: most KV-cache tokens the running batch may hold, counting each request's "
        "prompt plus its max_tokens; requests beyond it (or --max-batch) wait their turn, first come first served",
        default=65536,
    )
    batch_wait_ms: float = _help(
        "how long an idle worker waits for more requests before starting a batch", default=5.0
    )
    max_prompt_tokens: int = _help("longest prompt accepted, in tokens", default=2048)
    max_tokens: int = _help("largest max_tokens a request may ask for", default=1024)
    max_body_bytes: int = _help("largest request body accepted, in bytes", default=1_000_000)

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {low} (got {getattr(self, name)})"
            for name, low in [
                ("port", 0),
                ("max_batch", 1),
                ("max_kv_tokens", 2),
                ("max_prompt_tokens", 1),
                ("max_tokens", 1),
                ("max_body_bytes", 1),
            ]
            if getattr(self, name) < low
        ]
        if not 0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS:  # NaN too; an infinite wait killed the worker
            problems.append(f"batch_wait_ms must be a number from 0 to {MAX_BATCH_WAIT_MS} (got {self.batch_wait_ms})")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty (give a key, or none: then clients need none and adapters stay fixed)")
        if self.adapters_root is not None and not Path(self.adapters_root).expanduser().is_dir():
            problems.append(f"adapters_root {self.adapters_root!r} is not a folder")
        if self.port > 65535:
            problems.append(f"port must be <= 65535 (got {self.port})")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)} (got {self.scheduler!r})")
        if self.prefill not in PREFILLS:
            problems.append(f"prefill must be one of {', '.join(PREFILLS)} (got {self.prefill!r})")
        if self.half_weights not in HALF_WEIGHTS:
            problems.append(f"half_weights must be one of {', '.join(HALF_WEIGHTS)} (got {self.half_weights!r})")
        if self.quantize not in QUANTIZE:
            problems.append(f"quantize must be one of {', '.join(QUANTIZE)} (got {self.quantize!r})")
        elif self.quantize != "off" and self.half_weights != "off":
            problems.append(f"quantize {self.quantize} and half_weights {self.half_weights}: choose one of the two")
        if self.lora_dtype not in LORA_DTYPES:
            problems.append(f"lora_dtype must be one of {', '.join(LORA_DTYPES)} (got {self.lora_dtype!r})")
        if problems:
            raise ConfigError("serve: " + "; ".join(problems))

    @classmethod
    def help_of(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)
