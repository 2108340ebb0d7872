"""How A and B start: PEFT's `init_lora_weights`, one function per choice, by name.

Each function gets the layer and its new adapter and sets A and B in place. Those that move part
of the base weight into the adapter (PiSSA, OLoRA) subtract it from the base, so the model's output
is unchanged at start, and keep the starting A0, B0 so a saved adapter can be re-expressed
against the original weight (checkpoint/peft_io.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def kaiming(layer, adapter) -> None:
    """PEFT's default: Kaiming-uniform A (as nn.Linear initialises), zero B; for embeddings A zero, B normal."""
    if layer.kind == "embedding":
        nn.init.zeros_(adapter.A)
        nn.init.normal_(adapter.B)
    else:
        nn.init.kaiming_uniform_(adapter.A, a=math.sqrt(5))


def random(layer, adapter) -> None:
    """A and B both random: a non-zero update from the start (for tests)."""
    nn.init.normal_(adapter.A, std=0.02)
    nn.init.normal_(adapter.B, std=0.02)


def gaussian(layer, adapter) -> None:
    """Normal A with std 1 / r, zero B."""
    nn.init.normal_(adapter.A, std=1.0 / adapter.r)


def pissa(layer, adapter) -> None:
    """PiSSA: A, B from the top-r singular triplets of W; the base keeps the residual.

    W = U S V^T. With s = scaling, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so s B A is the
    best rank-r approximation of W, and W - s B A (the residual) stays frozen in the base. The
    output is unchanged at start, but training moves the principal directions. An embedding starts as
    the default does and keeps its weight, as in PEFT.
    """
    if layer.kind == "embedding":
        return kaiming(layer, adapter)
    U, S, Vh = torch.linalg.svd(layer.weight_as_out_in().float(), full_matrices=False)
    root = torch.sqrt(S[: adapter.r] / adapter.scaling)
    adapter.B.copy_(U[:, : adapter.r] * root)
    adapter.A.copy_(root[:, None] * Vh[: adapter.r])
    _move_into_adapter(layer, adapter)


def olora(layer, adapter) -> None:
    """OLoRA: W = Q R; B = Q_r (orthonormal columns), A = R_r (its first r rows); the base keeps W - s B A. An
    embedding starts as the default does (as in PEFT)."""
    if layer.kind == "embedding":
        return kaiming(layer, adapter)
    Q, R = torch.linalg.qr(layer.weight_as_out_in().float())
    adapter.B.copy_(Q[:, : adapter.r])
    adapter.A.copy_(R[: adapter.r])
    _move_into_adapter(layer, adapter)


def _move_into_adapter(layer, adapter) -> None:
    # Kept (not saved) so the trained adapter can be re-expressed against the original W.
    adapter.register_buffer("A0", adapter.A.detach().clone(), persistent=False)
    adapter.register_buffer("B0", adapter.B.detach().clone(), persistent=False)
    layer.add_to_weight(-adapter.delta_weight())


# init_lora_weights value -> initialisation; 'loftq' starts as the default and is set by lorakit.quant.
INITS: dict[bool | str, Callable] = {
    True: kaiming,
    False: random,
    "gaussian": gaussian,
    "pissa": pissa,
    "olora": olora,
    "loftq": kaiming,
}
MOVES_BASE = ("pissa", "olora")  # inits that take part of W into the adapter


@torch.no_grad()
def initialize(layer, adapter, init: bool | str) -> None:
    """Set `adapter`'s A and B as `init` says (a key of INITS)."""
    INITS[init](layer, adapter)
