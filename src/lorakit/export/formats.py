"""The export formats, one registry: `gguf` (a merged model) and `gguf-lora` (the adapter alone).

`export(ExportConfig(...))` is what `lorakit export` calls; each format is a function taking the
validated config and returning an `ExportResult`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.export.errors import ExportError
from lorakit.export.gguf_tensors import OUTTYPES

logger = logging.getLogger(__name__)


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ExportConfig:
    """What to export, in which format, and where."""

    model: str | None = _help("the base: built-in name, folder, .gguf or Hub id (gguf-lora: default "
                              "the adapter's base_model_name_or_path)", default=None)
    adapter: str | None = _help("a PEFT-format adapter folder; gguf merges it, gguf-lora exports it alone",
                                default=None)
    format: str = _help("gguf (one file for llama.cpp / Ollama) or gguf-lora (llama.cpp's LoRA adapter)",
                        default="gguf")
    outtype: str = _help("tensor storage: f32, f16 or q8_0 (norms and biases stay f32)", default="f16")
    output: str | None = _help("the file to write; default <run or model>-<outtype>.gguf", default=None)
    force: bool = _help("overwrite an existing output file", default=False)
    ollama: bool = _help("gguf: also write an Ollama Modelfile beside the file", default=False)
    template: str | None = _help("the prompt template (seed, alpaca, chat, a format string); default the "
                                 "adapter's, from its lorakit.json", default=None)

    def problems(self) -> list[str]:
        out = []
        if self.format not in FORMATS:
            out.append(f"--format: given {self.format!r}, expected one of {', '.join(FORMATS)}")
        if self.outtype not in OUTTYPES:
            out.append(f"--outtype: given {self.outtype!r}, expected one of {', '.join(OUTTYPES)}")
        if self.format == "gguf" and not self.model:
            out.append("--model: required for --format gguf (the base the adapter is merged into)")
        if self.format == "gguf-lora" and not self.adapter:
            out.append("--adapter: required for --format gguf-lora")
        if self.format == "gguf-lora" and self.ollama:
            out.append("--ollama: goes with --format gguf (Ollama's ADAPTER needs a base GGUF too)")
        if self.format == "gguf-lora" and self.template is not None:
            out.append("--template: goes with --format gguf (a LoRA GGUF holds no prompt template)")
        for flag, value in [("--model", self.model), ("--adapter", self.adapter), ("--output", self.output),
                            ("--template", self.template)]:
            if value is not None and not str(value).strip():
                out.append(f"{flag}: empty; give a value or leave the flag out")
        return out

    def inputs(self) -> tuple[str, ...]:
        """The files and folders the export reads that exist here (a Hub id or a built-in name is neither)."""
        return tuple(str(p) for p in (self.model, self.adapter) if p and Path(p).expanduser().exists())

    def stem(self) -> str:
        """The export's name: the adapter's run (its folder, or the run folder holding `adapter/`), else the model
        (a .gguf file's name without the suffix)."""
        if self.adapter:
            folder = Path(self.adapter).resolve()
            return folder.parent.name if folder.name == "adapter" else folder.name
        model = Path(str(self.model)).expanduser()
        model = model.resolve() if model.is_dir() else model  # '.' names its folder
        return model.stem if model.suffix == ".gguf" else model.name

    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        kind = "-lora" if self.format == "gguf-lora" else ""
        return Path(f"{self.stem()}{kind}-{self.outtype}.gguf")


@dataclass
class ExportResult:
    path: Path
    bytes: int
    seconds: float
    modelfile: Path | None = None


FORMATS: dict[str, Callable[[ExportConfig], ExportResult]] = {}


def register_format(name: str):
    def add(fn: Callable[[ExportConfig], ExportResult]):
        FORMATS[name] = fn
        return fn

    return add


def export(config: ExportConfig) -> ExportResult:
    """Validate `config` (every problem reported at once) and run its format's exporter.

    Raises:
        ExportError: a bad option, an existing output without `force`, an unsupported model or
            tokenizer, an adapter llama.cpp cannot apply, or a write that failed (nothing is left).
        AdapterError: the adapter cannot be read or does not belong to the base.
    """
    from lorakit.export import gguf_export  # noqa: F401  (registers the GGUF formats)

    problems = config.problems()
    if problems:
        raise ExportError("; ".join(problems))
    start = time.perf_counter()
    result = FORMATS[config.format](config)
    result.seconds = time.perf_counter() - start
    return result
