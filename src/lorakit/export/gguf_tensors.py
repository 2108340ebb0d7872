"""Tensor storage types in a GGUF file: what each outtype stores each tensor as, and the bytes.

llama.cpp's rules, which lorakit follows so its files hold what llama.cpp's own converter writes:
norms and every 1-D tensor (biases) stay f32, position embeddings stay f32, other weights take
the outtype. A q8_0 weight whose rows do not split into 32-value blocks is stored as f16.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np
import torch

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ALWAYS_F32 = (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight",)


def storage_type(name: str, tensor: np.ndarray, outtype: str) -> Q:
    """The type tensor `name` is stored as under `outtype` (before any q8_0 fallback)."""
    if tensor.ndim <= 1 or name.endswith("_norm.weight") or name in ALWAYS_F32:
        return Q.F32
    if not name.endswith((".weight", ".lora_a", ".lora_b")):
        return Q.F32
    return OUTTYPES[outtype][0]


def encode(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, Q]:
    """(bytes or values as numpy, storage type) for one tensor, ready for `GGUFWriter.add_tensor`."""
    data = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
    qtype = storage_type(name, data, outtype)
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: llama.cpp's converter uses f16
        logger.info("%s: shape %s does not fit %s blocks, stored as f16", name, data.shape, qtype.name)
        return gguf.quants.quantize(data, Q.F16), Q.F16
