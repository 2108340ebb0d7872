"""Run an exported GGUF in the real llama.cpp (through llama-cpp-python) to check what was written.

llama-cpp-python is optional (lorakit's `test` extra installs it); these helpers import it when
called. Every function works on token ids, so a comparison with transformers is token for token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.export.errors import ExportError

GGML_TYPE_F32 = 0  # ggml's type id for float32 (llama_cpp.GGML_TYPE_F32)


def load_llama(path: str | Path, lora: str | Path | None = None, n_ctx: int = 512, logits_all: bool = False,
               f32_cache: bool = False) -> Any:
    """A llama_cpp.Llama on `path` (and a LoRA adapter GGUF), quiet, on this process's CPU threads.

    `f32_cache` keeps the attention's K/V cache in f32 (llama.cpp's default is f16, which alone moves
    logits by ~1e-3): for comparing logits, not for speed.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ExportError("checking in llama.cpp needs llama-cpp-python: pip install 'lorakit[test]'") from None
    threads = max(1, len(os.sched_getaffinity(0)))
    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0, **cache)


def greedy_ids(llm: Any, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation of `prompt_ids` (argmax each step), stopping at a stop id (not returned)."""
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(last_logits(llm)))
        if token in stop_ids:
            break
        out.append(token)
        llm.eval([token])
    return out


def last_logits(llm: Any) -> np.ndarray:
    """The logits after the last evaluated token (llama-cpp-python keeps `scores` only with logits_all)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def prompt_logits(llm: Any, prompt_ids: list[int]) -> np.ndarray:
    """(len(prompt_ids), vocab) logits of every prompt position; `llm` needs logits_all=True."""
    llm.reset()
    llm.eval(prompt_ids)
    return np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)


def tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's token ids for `text`, no BOS added, special-token text not parsed (as add_special_tokens=False)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
