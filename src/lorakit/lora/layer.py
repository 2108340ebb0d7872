"""The LoRA layer: a frozen base layer plus one or more named adapters, each owning its term.

For a base weight W (out x in), a plain adapter adds a low-rank update

    h = W x + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r)

Variants (lora/variants/) change how the update enters; the layer never reads an adapter's
tensors, it asks the adapter: `output` in a forward pass, `merge`/`unmerge` for the weight, the
fused halves for the lean training path (lora/fused.py; sibling layers as one GEMM in
lora/fused_siblings.py).

One `LoraLayer` wraps any of three base kinds; they differ only in how the (out, in) update
lines up with the stored weight and how the adapter reads the input:

    kind        base weight       update added to the weight     adapter input
    linear      (out, in)         B A                            x
    conv1d      (in, out)  GPT-2  (B A)^T                        x
    embedding   (num, dim)        (B A)^T   (A: r x num)         one-hot(ids), i.e. a row lookup in A^T
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.lora.base import Conv1D, dequantized_weight, is_quantized, layer_kind
from lorakit.lora.fused import fused_adapter_linear
from lorakit.lora.variants import LoraAdapter

__all__ = ["LoraAdapter", "LoraLayer", "SavedModule", "layer_kind"]


class LoraLayer(nn.Module):
    """A frozen base layer and its adapters, keyed by name (one adapter module per name)."""

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
        self.sibling_group = None  # a lora.fused_siblings.SiblingGroup: q/k/v or gate/up as one GEMM
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
        variant: type[LoraAdapter] = LoraAdapter,
    ) -> LoraAdapter:
        """Create adapter `name` (of class `variant`) and make it active. `init` follows PEFT's `init_lora_weights`."""
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' already exists on this layer")
        if self.kind not in variant.KINDS:
            raise TypeError(f"{variant.__name__} sits on {', '.join(variant.KINDS)} layers, not on a {self.kind}")
        dropout = 0.0 if self.kind == "embedding" else dropout  # PEFT applies no dropout to embeddings
        adapter = variant(self.in_features, self.out_features, r, alpha, dropout, use_rslora)
        weight = self.base_layer.weight
        adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
        self.adapters[name] = adapter
        adapter.initialize(self, init)
        self.active.append(name)
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    # -- the base weight --------------------------------------------------------------------
    def weight_as_out_in(self) -> torch.Tensor:
        """The base weight as (out, in), dequantised (float32) for a quantised base; a view otherwise."""
        weight = dequantized_weight(self.base_layer) if is_quantized(self.base_layer) else self.base_layer.weight
        return weight if self.kind == "linear" else weight.T

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """Add an (out, in) update to the base weight, whatever its layout."""
        weight = self.base_layer.weight
        if not weight.is_floating_point() or is_quantized(self.base_layer):
            raise TypeError(
                f"cannot merge into a quantised {type(self.base_layer).__name__} (weight stored as {weight.dtype}); "
                "dequantise first with lorakit.quant.dequantize_model(model) (merge_and_unload does it for you)"
            )
        weight.add_((delta if self.kind == "linear" else delta.T).to(weight.dtype))

    # -- merge ------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the given (default: active) adapters into the base weight."""
        for name in names if names is not None else self.active:
            if name not in self.merged:
                self.adapters[name].merge(self)
                self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Take merged adapters (default: all of them, last merged first) out of the base weight again."""
        for name in list(reversed(self.merged)) if names is None else names:
            if name in self.merged:
                self.adapters[name].unmerge(self)
                self.merged.remove(name)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged:  # the weights are never changed here: disable_adapters unmerges first
                raise RuntimeError(
                    f"adapters {self.merged} are merged into this layer; unmerge them before disabling "
                    "(lorakit.disable_adapters(model) does)"
                )
            return self._base(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self.row_adapters.forward(self, x, *args, **kwargs)
        if self.sibling_group is not None:
            out = self.sibling_group.output(self, x)
            if out is not None:
                return out
        if self.can_fuse():
            return self._fused_forward(x)
        out = self._base(x, *args, **kwargs)
        for name in self.active:
            if name not in self.merged:
                out = self.adapters[name].output(self, x, out)
        return out

    def _base(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output; a base kept in a half type (train.half_base) answers in x's type."""
        weight = self.base_layer.weight
        if self.kind == "embedding" or not x.is_floating_point() or weight.dtype == x.dtype or is_quantized(self.base_layer):
            return self.base_layer(x, *args, **kwargs)
        return self.base_layer(x.to(weight.dtype), *args, **kwargs).to(x.dtype)

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

    def fused_parts(self) -> tuple[LoraAdapter, torch.Tensor, torch.Tensor | None]:
        """(the one adapter the fused path applies, the base weight as (out, in), the base bias)."""
        weight = self.base_layer.weight if self.kind == "linear" else self.base_layer.weight.T  # (out, in)
        return self.adapters[self.active[0]], weight, self.base_layer.bias

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter, weight, bias = self.fused_parts()
        return fused_adapter_linear(x.to(adapter.fused_params()[0].dtype), weight, bias, adapter, self.training)

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
