"""A LoRA adapter as llama.cpp's adapter GGUF (`general.type = adapter`), applied on a base GGUF.

llama.cpp scales every pair by one file-wide `adapter.lora.alpha` over that pair's rank, where
PEFT/lorakit scale by each module's own alpha over r (or sqrt(r) with rsLoRA), with per-module
ranks and alphas from `rank_pattern` / `alpha_pattern`. The export keeps the adapter's
`lora_alpha` as the file's alpha and folds each module's remaining factor into its B, so
llama.cpp computes the same update: s_i B_i A_i = (alpha / r_i) (c_i B_i) A_i, c_i = s_i r_i / alpha.

A LoRA on the token embeddings (PEFT's lora_embedding_A (r, vocab) and lora_embedding_B (dim, r)) is
written as llama.cpp's converter writes it: `token_embd.weight.lora_a` holds A^T, whose rows llama.cpp
looks up by token before multiplying by B. On a base that ties its head to the embeddings llama.cpp
finds that pair for the head too (one tensor name serves both) and aborts, so there it is refused.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import gguf
from torch import nn

from lorakit import LoraLayer
from lorakit.config import LoraConfig
from lorakit.export.arch import architecture_for
from lorakit.export.errors import ExportError
from lorakit.export.gguf_tensors import encode
from lorakit.export.output import write_with

logger = logging.getLogger(__name__)

TOKEN_EMBEDDINGS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


def check_llama_cpp_can_apply(config: LoraConfig, adapter_dir: Path) -> None:
    """Refuse, in one line, adapters whose update llama.cpp's LoRA loader cannot express."""
    if config.modules_to_save:
        raise ExportError(
            f"{adapter_dir}: the adapter trains whole modules ({', '.join(config.modules_to_save)}), which "
            "llama.cpp cannot apply as a LoRA; export the merged model instead (--format gguf)"
        )
    if config.bias != "none":
        raise ExportError(
            f"{adapter_dir}: the adapter trains biases (lora.bias: {config.bias}), which llama.cpp's LoRA "
            "cannot apply; export the merged model instead (--format gguf)"
        )


def check_head_is_apart(model: nn.Module, adapter_dir: Path) -> None:
    """Refuse a LoRA on the output head or the embeddings of a base that ties the two: the base's GGUF then holds
    no `output.weight` for llama.cpp to apply a head's LoRA to, and llama.cpp applies the embeddings' to the
    head as well."""
    if not model.config.get_text_config().tie_word_embeddings:
        return
    if isinstance(model.get_output_embeddings(), LoraLayer):
        raise ExportError(
            f"{adapter_dir}: the adapter puts LoRA on the output head, which this base ties to its embeddings, so "
            "the base's GGUF has no output.weight for llama.cpp to apply it to; export the merged model instead "
            "(--format gguf)"
        )
    if isinstance(model.get_input_embeddings(), LoraLayer):
        raise ExportError(
            f"{adapter_dir}: the adapter puts LoRA on the embeddings, which this base ties to its output head; "
            "llama.cpp applies it to the head too (one tensor serves both), where its shapes do not fit and "
            "llama.cpp aborts; export the merged model instead (--format gguf)"
        )


def lora_pairs(model: nn.Module, adapter: str, alpha: float):
    """Yield (module path, its kind, A (r, in), B folded for llama.cpp (out, r)) for every LoRA layer of `adapter`
    (an embedding's A is (r, vocab), its B (dim, r))."""
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.adapters:
            continue
        pair = layer.adapters[adapter]
        # (A, B, s) with s B A the whole update; None for a variant (DoRA, ...) that is more than that
        factors = pair.low_rank_factors() if hasattr(pair, "low_rank_factors") else (pair.A, pair.B, pair.scaling)
        if factors is None:
            raise ExportError(
                f"the adapter's {type(pair).__name__} on {path!r} is not a plain low-rank update, which is all "
                "llama.cpp's LoRA applies; export the merged model instead (--format gguf)"
            )
        A, B, scaling = factors
        fold = scaling * A.shape[0] / alpha  # 1 for a plain adapter: then B is written unchanged
        A, B = A.detach().float(), B.detach().float()
        yield path, layer.kind, A, B if math.isclose(fold, 1.0, rel_tol=1e-12) else B * fold


def write_lora_gguf(model: nn.Module, config: LoraConfig, path: Path, outtype: str, name: str,
                    adapter: str = "default") -> int:
    """Write adapter `adapter` of `model` (a base with the adapter loaded) to `path` as a llama.cpp LoRA GGUF.

    Returns:
        The file's size in bytes.
    """
    arch = architecture_for(model.config)
    alpha = float(config.lora_alpha)
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    count = 0
    for module, kind, A, B in lora_pairs(model, adapter, alpha):
        target = arch.lora_target(module, model.config)
        if target is None:
            raise ExportError(f"the adapter's module {module!r} has no llama.cpp tensor to apply to")
        tensor, reorder_rows = target
        if kind == "embedding":
            if tensor != TOKEN_EMBEDDINGS:
                raise ExportError(
                    f"the adapter puts LoRA on the embedding {module!r}, and llama.cpp applies LoRA to the token "
                    "embeddings only; export the merged model instead (--format gguf)"
                )
            A = A.T  # (vocab, r): llama.cpp takes each token's row of it, then multiplies by B
        for suffix, value in ((".lora_a", A), (".lora_b", reorder_rows(B))):
            data, qtype = encode(tensor + suffix, value, outtype)
            writer.add_tensor(tensor + suffix, data, raw_dtype=qtype)
        count += 1
    if count == 0:
        raise ExportError(f"adapter {adapter!r} has no LoRA layers to export")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_with(path, write)
    logger.info("wrote %s: %d LoRA pairs, alpha %g", path, count, alpha)
    return path.stat().st_size
