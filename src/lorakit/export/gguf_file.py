"""A transformers causal LM (with any adapter already merged) as one GGUF file for llama.cpp.

The file holds what llama.cpp's own converter writes for the same model: `general.*` keys, the
architecture's hyperparameters, the tokenizer, and the tensors under llama.cpp's names in the
outtype's storage types. lorakit adds `lorakit.*` keys: the prompt template the adapter was
trained with, so the file carries the run's own prompt format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from lorakit.export.arch import architecture_for
from lorakit.export.gguf_tensors import OUTTYPES, encode
from lorakit.export.gguf_vocab import Vocab, vocab_from_tokenizer
from lorakit.export.output import write_with

logger = logging.getLogger(__name__)

TEMPLATE_KEYS = ("lorakit.template.name", "lorakit.template.prompt", "lorakit.template.prompt_no_input",
                 "lorakit.task")


@dataclass(frozen=True)
class PromptInfo:
    """The prompt format an adapter was trained with (from its `lorakit.json`)."""

    name: str  # "seed", "alpaca", "chat", "custom"
    prompt: str | None = None  # a format string with {instruction} (None for chat: the chat template)
    prompt_no_input: str | None = None
    task: str | None = None  # the eval task the run was scored on, e.g. "ros2"

    def write(self, writer: gguf.GGUFWriter) -> None:
        values = (self.name, self.prompt, self.prompt_no_input, self.task)
        for key, value in zip(TEMPLATE_KEYS, values):
            if value is not None:
                writer.add_string(key, value)


def check_exportable(config: Any, tokenizer: Any = None) -> Vocab | None:
    """What write_model_gguf refuses that a model's config (and tokenizer) already tell, checked before its weights
    load: the architecture, its RoPE settings, the tokenizer. Returns the tokenizer's Vocab (for write_model_gguf).

    Raises:
        UnsupportedArchitectureError, UnsupportedTokenizerError: as write_model_gguf would.
    """
    arch = architecture_for(config)
    arch.write_hparams(gguf.GGUFWriter(path=None, arch=arch.gguf_arch), config)  # refuses RoPE it cannot hold
    return None if tokenizer is None else vocab_from_tokenizer(tokenizer, config.vocab_size, config)


def write_model_gguf(
    model: torch.nn.Module, tokenizer: Any, path: Path, outtype: str, name: str, prompt: PromptInfo | None = None,
    vocab: Vocab | None = None,
) -> int:
    """Write `model` and `tokenizer` to `path` (atomically) as a GGUF file; returns its size in bytes.

    Args:
        model: a plain transformers causal LM (no LoRA wrappers: merge first).
        outtype: "f32", "f16" or "q8_0".
        name: `general.name`.
        prompt: the training prompt format, stored under `lorakit.*` keys.
        vocab: the tokenizer's, where check_exportable read it already.

    Raises:
        UnsupportedArchitectureError, UnsupportedTokenizerError: llama.cpp would not run it as trained.
    """
    config = model.config
    arch = architecture_for(config)
    file_type = OUTTYPES[outtype][1]
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    if vocab is None:  # checked before any tensor is converted
        vocab = vocab_from_tokenizer(tokenizer, config.vocab_size, config)
    state = {k: v for k, v in model.state_dict().items()}
    for tensor_name, tensor in arch.tensors(state, config):
        data, qtype = encode(tensor_name, tensor, outtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    total, shared, expert, experts = writer.get_total_parameter_count()
    writer.add_size_label(gguf.size_label(total, shared, expert, experts))
    arch.write_hparams(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    if prompt is not None:
        prompt.write(writer)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_with(path, write)
    logger.info("wrote %s (%s, %d tensors)", path, outtype, len(state))
    return path.stat().st_size
