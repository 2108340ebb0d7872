"""Export what lorakit trains to the formats other runtimes read.

Formats (registry in `formats.py`): `gguf`, one file for llama.cpp, Ollama, LM Studio and
llama-cpp-python (the adapter merged into the base); `gguf-lora`, llama.cpp's LoRA adapter file,
applied on a base GGUF at load time.
"""

from lorakit.export.errors import ExportError
from lorakit.export.formats import FORMATS, ExportConfig, ExportResult, export
from lorakit.export.gguf_file import PromptInfo, write_model_gguf
from lorakit.export.gguf_lora import write_lora_gguf
from lorakit.export.gguf_tensors import OUTTYPES

__all__ = [
    "FORMATS",
    "OUTTYPES",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "PromptInfo",
    "export",
    "write_lora_gguf",
    "write_model_gguf",
]
