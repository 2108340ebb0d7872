"""The LoRA layer: a frozen base layer plus one or more named low-rank adapters.

For a base weight W (out x in), an adapter adds a low-rank update

    h = W x + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r)

B starts at zero, so a fresh adapter leaves the model unchanged. With rsLoRA the scale is
alpha / sqrt(r). Merging folds (alpha / r) * B A into W; unmerging subtracts it again.

One `LoraLayer` wraps any of three base kinds; they differ only in how the (out, in) update
lines up with the stored weight and how the adapter reads the input:

    kind        base weight       update added to the weight     adapter input
    linear      (out, in)         B A                            x
    conv1d      (in, out)  GPT-2  (B A)^T                        x
    embedding   (num, dim)        (B A)^T   (A: r x num)         one-hot(ids), i.e. a row lookup in A^T
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.fused import fused_lora_linear

try:  # GPT-2's Conv1D is a Linear with a transposed weight.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

INIT_CHOICES = (True, False, "gaussian", "pissa", "loftq")  # loftq: set later by lorakit.quant


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'embedding' for a base layer LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):  # also bitsandbytes' Linear4bit / Linear8bitLt
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


class LoraAdapter(nn.Module):
    """One named adapter: A, B, their scale and the dropout on the adapter's input."""

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool
    ):
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, r))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update this adapter adds to the base weight."""
        return (self.B @ self.A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.T) @ self.B.T * self.scaling  # (..., in) -> (..., r) -> (..., out)


class LoraLayer(nn.Module):
    """A frozen base layer and its adapters, keyed by name (one `LoraAdapter` per name)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(
                f"LoRA wraps nn.Linear, GPT-2 Conv1D or nn.Embedding, not {type(base_layer).__name__}"
            )
        self.kind = kind
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []  # adapters applied in forward, in order
        self.merged: list[str] = []  # adapters currently folded into the base weight
        self.disabled = False
        self.fused = True  # the lean autograd path (lora/fused.py) where it applies
        self.row_adapters = None  # a lora.mixed.RowAdapters while a mixed-adapter batch runs
        base_layer.requires_grad_(False)

    # -- shape of the base ------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        if self.kind == "linear":
            return self.base_layer.in_features
        if self.kind == "conv1d":
            return self.base_layer.weight.shape[0]
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        if self.kind == "linear":
            return self.base_layer.out_features
        if self.kind == "conv1d":
            return self.base_layer.weight.shape[1]
        return self.base_layer.embedding_dim

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: bool | str = True,
    ) -> LoraAdapter:
        """Create adapter `name` and make it active. `init` follows PEFT's `init_lora_weights`."""
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' already exists on this layer")
        dropout = 0.0 if self.kind == "embedding" else dropout  # PEFT applies no dropout to embeddings
        adapter = LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora)
        weight = self.base_layer.weight
        adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
        self.adapters[name] = adapter
        self._init_adapter(adapter, init)
        self.active.append(name)
        return adapter

    @torch.no_grad()
    def _init_adapter(self, adapter: LoraAdapter, init: bool | str) -> None:
        if init is False:  # random A and B: a non-zero update, for tests
            nn.init.normal_(adapter.A, std=0.02)
            nn.init.normal_(adapter.B, std=0.02)
        elif init == "pissa":
            self._init_pissa(adapter)
        elif init == "gaussian":
            nn.init.normal_(adapter.A, std=1.0 / adapter.r)
        elif self.kind == "embedding":  # PEFT's choice for embeddings: A zero, B normal
            nn.init.zeros_(adapter.A)
            nn.init.normal_(adapter.B)
        else:  # PEFT's default: Kaiming-uniform A (as nn.Linear initialises), zero B
            nn.init.kaiming_uniform_(adapter.A, a=math.sqrt(5))

    def _init_pissa(self, adapter: LoraAdapter) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; the base keeps the residual.

        W = U S V^T. With s = scaling, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so s B A is
        the best rank-r approximation of W, and W - s B A (the residual) stays frozen in the base.
        The model's output is unchanged at start, but training moves the principal directions.
        """
        weight = self._weight_as_out_in().float()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[: adapter.r] / adapter.scaling)
        adapter.B.copy_(U[:, : adapter.r] * root)
        adapter.A.copy_(root[:, None] * Vh[: adapter.r])
        # Kept (not saved) so the trained adapter can be re-expressed against the original W.
        adapter.register_buffer("A0", adapter.A.detach().clone(), persistent=False)
        adapter.register_buffer("B0", adapter.B.detach().clone(), persistent=False)
        self._add_to_weight(-adapter.delta_weight())

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    # -- merge ------------------------------------------------------------------------------
    def _weight_as_out_in(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight if self.kind == "linear" else weight.T

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        """Add an (out, in) update to the base weight, whatever its layout."""
        weight = self.base_layer.weight
        if not weight.is_floating_point():  # bitsandbytes packs 4/8-bit weights into integer tensors
            raise TypeError(
                f"cannot merge into a quantised {type(self.base_layer).__name__} (weight stored as {weight.dtype}); "
                "dequantise first with lorakit.quant.dequantize_model(model) (merge_and_unload does it for you)"
            )
        weight.add_((delta if self.kind == "linear" else delta.T).to(weight.dtype))

    def merge(self, names: list[str] | None = None) -> None:
        """Fold the given (default: active) adapters into the base weight."""
        for name in names if names is not None else self.active:
            if name not in self.merged:
                self._add_to_weight(self.adapters[name].delta_weight())
                self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters (default: all of them) from the base weight again."""
        for name in list(reversed(self.merged)) if names is None else names:
            if name in self.merged:
                self._add_to_weight(-self.adapters[name].delta_weight())
                self.merged.remove(name)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        if self.row_adapters is not None and not self.disabled:
            return self.row_adapters.forward(self, x, *args, **kwargs)
        if self.can_fuse():
            return self._fused_forward(x)
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        for name in self.active:
            if name not in self.merged:
                out = out + self._adapter_output(self.adapters[name], x).to(out.dtype)
        return out

    def can_fuse(self) -> bool:
        """One active unmerged adapter on a plain float Linear/Conv1D whose weight and bias are frozen."""
        base = self.base_layer
        return (
            self.fused
            and not self.disabled
            and self.row_adapters is None
            and self.kind in ("linear", "conv1d")
            and type(base) in (nn.Linear, Conv1D)
            and len(self.active) == 1
            and not self.merged
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not torch.is_autocast_enabled(base.weight.device.type)  # its backward does its own dtypes
        )

    def fused_parts(self) -> tuple:
        """(weight as (out, in), bias, A, B, scaling, dropout p) of the one adapter the fused path applies."""
        adapter = self.adapters[self.active[0]]
        weight = self.base_layer.weight if self.kind == "linear" else self.base_layer.weight.T  # (out, in)
        p = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
        return weight, self.base_layer.bias, adapter.A, adapter.B, adapter.scaling, p

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, A, B, scaling, p = self.fused_parts()
        return fused_lora_linear(x.to(A.dtype), weight, bias, A, B, scaling, p, self.training)

    def _adapter_output(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            base = self.base_layer
            rows = F.embedding(
                x, adapter.A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )  # (..., r)
            return rows @ adapter.B.T * adapter.scaling
        return adapter(x.to(adapter.A.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={list(self.adapters)}, active={self.active}, merged={self.merged}"


class SavedModule(nn.Module):
    """A module trained in full for each adapter (PEFT's `modules_to_save`, e.g. a classifier head).

    Each adapter gets its own copy; the original stays untouched and is used when no adapter that
    has a copy is active, or when adapters are disabled.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        original_module.requires_grad_(False)

    def add_copy(self, name: str) -> nn.Module:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.copies[name] = clone
        self.active = name
        return clone

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)
