"""Adapter factors as int8 values times a power of two per rank: rounding to them, and finding them again.

`lorakit serve --lora-dtype int8` rounds each rank of an adapter, a row of A (r, in) and a column of B (out, r),
to q 2^e with integer |q| <= 127 and e the smallest exponent whose 127 2^e holds the rank's largest magnitude:
an int8 adapter with one power-of-two scale per rank. The factors stay fp32 tensors holding those values, so
every path computes with them as with any factors (a merge, a prompt pass, one adapter alone). A mixed batch's
lane kernels (lora/column_kernel.py) find them again, exactly, and read them as int8 with each rank's scales
folded into its sum: a quarter of fp32's bytes.

A power of two, rather than any scale, keeps q 2^e exact in fp32 and lets the scale be found from the values
alone (also after (s B) multiplies B by the adapter's scaling s).
"""

from __future__ import annotations

import torch

QMAX = 127


def scales(peak: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Each row's scale unit 2^e (fp32), e the smallest exponent with peak <= 127 unit 2^e; unit where peak is 0.
    A peak above 127 unit 2^e by fp32 rounding alone (a 127 2^e times the unit, rounded up) takes that e."""
    ratio = torch.where(peak > 0, peak.double() / unit.double() / QMAX * (1 - 2**-20), 1.0)
    return (unit.double() * torch.exp2(torch.ceil(torch.log2(ratio)))).float()


@torch.no_grad()
def round_rows(v: torch.Tensor) -> torch.Tensor:
    """v (rows, k) with each row rounded to int8 values times a power of two (the nearest, ties to even)."""
    c = scales(v.abs().amax(dim=1), torch.ones(len(v), dtype=torch.float32, device=v.device))[:, None].to(v.dtype)
    return torch.round(v / c).clamp(-QMAX, QMAX) * c


@torch.no_grad()
def int8_rows(v: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 (rows, k), c fp32 (rows,)) with q c == v exactly in fp32, each row's c its unit (rows,) times a power
    of two; None where some row of fp32 `v` is not such values (an adapter not rounded by `round_rows`)."""
    if v.dtype != torch.float32 or not len(v) or not v.shape[1]:
        return None
    if len(v) > 1 and int8_rows(v[:1], unit[:1]) is None:  # most factors are not: one row tells, at little cost
        return None
    c = scales(v.abs().amax(dim=1), unit.float())
    q = torch.round(v.double() / c.double()[:, None])
    if not bool((q.abs() <= QMAX).all()):  # also false for NaN
        return None
    q = q.to(torch.int8)
    if not torch.equal(q.float() * c[:, None], v):
        return None
    return q, c
