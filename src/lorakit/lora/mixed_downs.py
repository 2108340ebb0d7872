"""The down-projection x A^T of a mixed-adapter batch's LoRA layer (lora/mixed.py), for its two batch-wide layouts.

    RowDown      gathered: each row's own copy of its adapter's A^T, (B, in, sum of r); x A^T is one bmm
    StackedDown  stacked: the batch's adapters' A^T side by side, (in, W), and a 0/1 mask per row keeping
                 its own adapter's columns; x A^T is one matmul over all rows

Either keeps the last input with its product, so that siblings fed the same x (q/k/v, gate/up) compute it
once and each slices its own columns, and adds s B^T's term to a layer's output (`add`): without
autograd, in place, riding on the second matmul.
"""

from __future__ import annotations

import torch


class RowDown:
    """x A^T for one layer or a group of siblings fed the same x, gathered per row: A_rows
    (B, in, sum of r), and the last input seen with its product, so each sibling after the first
    only slices it."""

    def __init__(self, A_rows: torch.Tensor):
        self.A_rows = A_rows
        self.width = A_rows.shape[-1]
        self._x: torch.Tensor | None = None
        self._version = -1
        self._h: torch.Tensor | None = None

    def of(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x (B, ..., in) -> x A^T restricted to columns start:stop, shape (B, T, stop - start)."""
        if x is not self._x or x._version != self._version:
            rows = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
            if rows.dtype != self.A_rows.dtype:
                rows = rows.to(self.A_rows.dtype)
            self._h = torch.bmm(rows, self.A_rows)
            self._x, self._version = x, x._version
        return self._h if stop - start == self.width else self._h[..., start:stop]

    def add(self, out: torch.Tensor, x: torch.Tensor, start: int, stop: int, B_rows: torch.Tensor) -> torch.Tensor:
        """out + (x A^T) s B^T row by row; B_rows (B, r, out). Without autograd the add rides on the
        second matmul, in place (baddbmm_): one op and one temporary fewer per layer and step."""
        h = self.of(x, start, stop)  # (B, T, r)
        if torch.is_grad_enabled() or out.dtype != B_rows.dtype or not out.is_contiguous():
            return out + torch.bmm(h, B_rows).reshape(out.shape).to(out.dtype)
        if out.dim() == 3:
            return out.baddbmm_(h, B_rows)
        return out.view(out.shape[0], -1, out.shape[-1]).baddbmm_(h, B_rows).view(out.shape)

    def select(self, index: torch.Tensor) -> None:
        self.A_rows = self.A_rows[index.to(self.A_rows.device)]
        self._x = self._h = None

    @staticmethod
    def keep(B_rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return B_rows[index.to(B_rows.device)]


class StackedDown(RowDown):
    """x A^T for every adapter of the batch at once: A (in, W) holds the adapters' A^T side by side
    (a sibling group's too), owner (W,) the slot of each column; row b keeps only its own slot's
    columns (mask (B, W)), so (x A^T * mask) s B^T with B stacked the same way is each row's term."""

    def __init__(self, A: torch.Tensor, owner: torch.Tensor, index: torch.Tensor):
        super().__init__(A)
        self.owner = owner
        self.mask = (index.to(owner.device)[:, None] == owner[None, :]).to(A.dtype)  # (B, W)

    def of(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x (B, ..., in) -> masked x A^T restricted to columns start:stop, shape (B * T, stop - start)."""
        if x is not self._x or x._version != self._version:
            rows = x.reshape(-1, x.shape[-1])
            if rows.dtype != self.A_rows.dtype:
                rows = rows.to(self.A_rows.dtype)
            h = rows @ self.A_rows  # (B * T, W)
            per_row = h.view(self.mask.shape[0], -1, self.width)
            if torch.is_grad_enabled():
                h = (per_row * self.mask[:, None]).view(h.shape)
            else:
                per_row.mul_(self.mask[:, None])
            self._h = h
            self._x, self._version = x, x._version
        return self._h if stop - start == self.width else self._h[:, start:stop]

    def add(self, out: torch.Tensor, x: torch.Tensor, start: int, stop: int, B: torch.Tensor) -> torch.Tensor:
        """out + (masked x A^T) s B^T; B (r, out) stacked. Without autograd, one addmm_ in place."""
        h = self.of(x, start, stop)  # (B * T, r)
        if torch.is_grad_enabled() or out.dtype != B.dtype or not out.is_contiguous():
            return out + (h @ B).view(out.shape).to(out.dtype)
        out.view(-1, out.shape[-1]).addmm_(h, B)
        return out

    def select(self, index: torch.Tensor) -> None:
        self.mask = self.mask[index.to(self.mask.device)]
        self._x = self._h = None

    @staticmethod
    def keep(B: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return B  # shared by every row
