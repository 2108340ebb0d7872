"""Several adapters combined into one (PEFT's `add_weighted_adapter`), by a method chosen by name.

For adapters i with weights w_i, updates s_i B_i A_i, each method is an entry of `COMBINATIONS`,
in one of three forms:

    cat       exact: the A_i stacked as rows, the w_i s_i B_i as columns, so B' A' = sum w_i s_i B_i A_i;
              rank = the sum of the ranks the module carries
    factors   linear, ties, dare_linear, dare_ties, magnitude_prune: the A_i combined, and the B_i
              combined, each adapter's w_i s_i split as sqrt|w_i s_i| sign(w_i s_i) on A and sqrt|w_i s_i|
              on B (the adapters share their rank r; the result has rank r)
    svd       svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the updates
              w_i s_i B_i A_i combined as whole matrices, then their top `svd_rank` singular triplets
              U S V^T give B = U S, A = V^T (rank: svd_rank, default the largest of the ranks, at
              most what the layer holds)

The new adapter has scale 1 (alpha = its rank). Its tensors combine with these operations on
tensors t_i (TIES: Yadav et al., 2023; DARE: Yu et al., 2024), in the layer's stored layout, as PEFT:

    magnitude pruning   keep the int(density * numel) entries of largest |t|, zero the rest
    random pruning      keep each entry with probability density and divide by density (DARE)
    sign election       per entry, the sign of sum_i t_i ('total') or of sum_i sign(t_i) ('frequency') over
                        the pruned tensors; ties keep the weighted entries that agree and average them
                        (disjoint mean)

With a single adapter every method is 'linear' (as PEFT does). DARE's masks come from
`generator` (the global torch generator if None) in PEFT's order: layer by layer, A's then B's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.config import ConfigError, LoraConfig
from lorakit.lora.adapters import adapter_config, lora_layers, saved_modules, set_adapter
from lorakit.lora.inits import MOVES_BASE

SIGN_METHODS = ("total", "frequency")


# -- operations on task tensors (each t is one adapter's tensor; weights one number per adapter) -----
def prune_by_magnitude(t: torch.Tensor, density: float, generator=None) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def prune_at_random(t: torch.Tensor, density: float, generator=None) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(-1, *[1] * (stacked.dim() - 1))  # (n, ...)


def elected_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """True where an adapter's entry has the elected sign; (n, ...) bool."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1, -1)


def _sum(prune: Callable | None) -> Callable:
    def combine(tensors, weights, density, sign_method, generator):
        if prune is not None:
            tensors = [prune(t, density, generator) for t in tensors]
        return _weighted(torch.stack(tensors), weights).sum(0)

    return combine


def _ties(prune: Callable) -> Callable:
    def combine(tensors, weights, density, sign_method, generator):
        stacked = torch.stack([prune(t, density, generator) for t in tensors])
        mask = elected_sign_mask(stacked, sign_method)
        kept = (_weighted(stacked, weights) * mask).sum(0)
        return kept / torch.clamp(mask.sum(0), min=1.0)  # the mean over the adapters that agree

    return combine


@dataclass(frozen=True)
class Combination:
    form: str  # 'cat', 'factors' or 'svd' (see the module docstring)
    combine: Callable | None  # (tensors, weights, density, sign method, generator) -> tensor
    needs_density: bool = False


COMBINATIONS: dict[str, Combination] = {
    "cat": Combination("cat", None),
    "linear": Combination("factors", _sum(None)),
    "ties": Combination("factors", _ties(prune_by_magnitude), True),
    "dare_linear": Combination("factors", _sum(prune_at_random), True),
    "dare_ties": Combination("factors", _ties(prune_at_random), True),
    "magnitude_prune": Combination("factors", _sum(prune_by_magnitude), True),
    "svd": Combination("svd", _sum(None)),
    "ties_svd": Combination("svd", _ties(prune_by_magnitude), True),
    "dare_linear_svd": Combination("svd", _sum(prune_at_random), True),
    "dare_ties_svd": Combination("svd", _ties(prune_at_random), True),
    "magnitude_prune_svd": Combination("svd", _sum(prune_by_magnitude), True),
}


@dataclass(frozen=True)
class _Options:
    combination: Combination
    density: float | None
    sign_method: str
    svd_rank: int
    svd_clamp: float | None
    generator: torch.Generator | None


@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module,
    names: list[str],
    weights: list[float],
    new_name: str,
    combination_type: str = "cat",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    generator: torch.Generator | None = None,
) -> LoraConfig:
    """Add adapter `new_name` combining adapters `names` with `weights` by `combination_type`.

    Args:
        combination_type: a key of COMBINATIONS; 'cat' (the default) is exact: its update is
            sum_i weights[i] * delta_i.
        density: the share of entries kept, in (0, 1]; needed by ties, dare_* and magnitude_prune*.
        majority_sign_method: 'total' or 'frequency' (ties and dare_ties).
        svd_rank: the rank of an *svd result (default: the largest rank of the adapters).
        svd_clamp: clamp the SVD factors to this quantile of their entries (None: no clamping).
        generator: where DARE's random masks come from (default: torch's global generator).

    Returns:
        The new adapter's config (it is also registered on the model, and made active).

    Raises:
        ConfigError: a name, weight, method or option is not allowed, naming it and what is.
    """
    configs = [adapter_config(model, n) for n in names]
    _check(model, names, weights, new_name, combination_type, configs, density, majority_sign_method, svd_rank,
           svd_clamp)
    method = "linear" if len(names) == 1 else combination_type  # PEFT's rule for a single adapter
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    rank = {"cat": sum(ranks), "factors": ranks[0], "svd": svd_rank or max(ranks)}[COMBINATIONS[method].form]
    options = _Options(COMBINATIONS[method], density, majority_sign_method, rank, svd_clamp, generator)

    held: dict[str, int] = {}
    for module_name, layer in lora_layers(model):
        parts = [(_factors(layer, n, module_name), w) for n, w in zip(names, weights) if n in layer.adapters]
        if not parts:
            continue
        A, B = _combined(layer, parts, options)
        held[module_name] = A.shape[0]
        new = layer.add_adapter(new_name, A.shape[0], float(A.shape[0]), 0.0, False, True)
        new.A.copy_(A)
        new.B.copy_(B)
    # r is the largest rank a module holds (cat over disjoint targets, or an svd_rank above a layer's size, hold
    # less than the ranks asked for); alpha = r everywhere keeps the scale at 1, whatever rank each module holds.
    rank = max(held.values(), default=rank)
    rank_pattern = {name: r for name, r in held.items() if r != rank}
    config = replace(
        configs[0],
        r=rank,
        lora_alpha=float(rank),
        lora_dropout=0.0,
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in rank_pattern.items()},
        target_modules=_targets_of(model, list(held)),
    )
    for _, wrapper in saved_modules(model):
        if names[0] in wrapper.copies:
            wrapper.copies[new_name] = copy.deepcopy(wrapper.copies[names[0]])
    model.lora_configs = {**model.lora_configs, new_name: config}
    set_adapter(model, new_name)
    return config


def _targets_of(model: nn.Module, carrying: list[str]) -> list[str]:
    """target_modules that pick out exactly the modules `carrying` the new adapter: their leaf names when those
    match no other module (the usual case), else their full names (a regex or a layer subset cut to leaf names
    would reach modules the adapter file has no weights for)."""
    leaves = sorted({n.split(".")[-1] for n in carrying})
    reached = {n for n, _ in model.named_modules() if n.split(".")[-1] in leaves and ".copies." not in n}
    return leaves if reached == set(carrying) else sorted(carrying)


def _check(model, names, weights, new_name, method, configs, density, sign_method, svd_rank, svd_clamp) -> None:
    problems = []
    if len(names) != len(weights) or not names:
        problems.append(f"weights: {len(weights)} given for {len(names)} adapters; give one weight per adapter")
    if new_name in model.lora_configs:
        problems.append(f"adapter '{new_name}' already exists on this model; pick another name")
    if any(c.modules_to_save for c in configs[1:]):
        problems.append("only the first adapter may carry modules_to_save (a trained head cannot be combined)")
    moved = [f"'{n}' ({c.init_lora_weights})" for n, c in zip(names, configs) if c.init_lora_weights in MOVES_BASE]
    if moved:
        problems.append(f"adapters {', '.join(moved)} hold part of W, which their init moved out of the base; a "
                        "combination would lose it: save them, then combine the saved folders on the original base")
    problems += option_problems(method, configs, density, sign_method, svd_rank, svd_clamp, weights)
    if problems:
        raise ConfigError("add_weighted_adapter: " + "; ".join(problems))


def option_problems(method: str, configs: list[LoraConfig], density, sign_method: str, svd_rank, svd_clamp=None,
                    weights=()) -> list[str]:
    """What is wrong with a combination's options for adapters with these configs, one line each."""
    problems = [f"weights: given {w!r}, expected a finite number" for w in weights
                if not isinstance(w, (int, float)) or not math.isfinite(w)]
    if svd_clamp is not None and (not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1):
        problems.append(f"svd_clamp: given {svd_clamp!r}, expected a quantile in [0, 1]")
    combination = COMBINATIONS.get(method)
    if combination is None:
        problems.append(f"combination_type: given {method!r}, expected one of {', '.join(COMBINATIONS)}")
    elif combination.needs_density and (
        not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1
    ):
        problems.append(f"density: given {density!r}; '{method}' needs the share of entries kept, in (0, 1]")
    ranks = {(c.r, tuple(sorted(c.rank_pattern.items()))) for c in configs}  # every module's rank, not the largest
    if combination and combination.form == "factors" and len(ranks) > 1:
        problems.append(
            f"combination_type '{method}' combines A's and B's entry by entry, so the adapters need one rank "
            f"(given {', '.join(str(c.r) for c in configs)}); use 'cat' or an *_svd method"
        )
    if sign_method not in SIGN_METHODS:
        problems.append(f"majority_sign_method: given {sign_method!r}, expected one of {', '.join(SIGN_METHODS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        problems.append(f"svd_rank: given {svd_rank!r}, expected a positive integer")
    return problems


def unused_options(method: str, density, sign_method: str, svd_rank, svd_clamp) -> list[str]:
    """Options given that `method` does not read (each would be ignored), one line each."""
    combination = COMBINATIONS.get(method)
    if combination is None:
        return []
    unused = []
    if density is not None and not combination.needs_density:
        unused.append(("density", density, "ties, dare_*, magnitude_prune*"))
    if sign_method != "total" and "ties" not in method:
        unused.append(("majority_sign_method", sign_method, "the ties methods"))
    for name, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
        if value is not None and combination.form != "svd":
            unused.append((name, value, "the *svd methods"))
    return [f"{name}: given {value!r}, which '{method}' does not use (it applies to {where})"
            for name, value, where in unused]


def _factors(layer, name: str, module_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    factors = layer.adapters[name].low_rank_factors()
    if factors is None:
        raise ConfigError(
            f"add_weighted_adapter: adapter '{name}' on {module_name} is a {type(layer.adapters[name]).__name__}, "
            "whose update is more than s B A; weighted merges combine plain LoRA adapters"
        )
    return factors


def _combined(layer, parts: list, options: _Options) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) of the new adapter on `layer`; parts: [((A_i, B_i, s_i), w_i)]."""
    form = options.combination.form
    if form == "cat":
        A = torch.cat([A for (A, _, _), _ in parts], dim=0)  # (sum r, in)
        B = torch.cat([B * (w * s) for (_, B, s), w in parts], dim=1)  # (out, sum r)
        return A, B
    combine = options.combination.combine
    if form == "factors":
        signed = [w * s for (_, _, s), w in parts]
        on_A = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in signed])
        on_B = torch.tensor([math.sqrt(abs(v)) for v in signed])
        A = combine([A for (A, _, _), _ in parts], on_A.to(parts[0][0][0].device), *_rest(options))
        B = combine([B for (_, B, _), _ in parts], on_B.to(parts[0][0][1].device), *_rest(options))
        return A.to(parts[0][0][0].dtype), B.to(parts[0][0][1].dtype)
    # svd: combine the updates in the layer's stored layout ((in, out) for Conv1D, (num, dim) for an
    # embedding), as PEFT does, then factor the (out, in) result.
    stored = (lambda d: d) if layer.kind == "linear" else (lambda d: d.T)
    deltas = [stored((B @ A) * s) for (A, B, s), _ in parts]
    weights = torch.tensor([w for _, w in parts]).to(deltas[0].device)
    delta = stored(combine(deltas, weights, *_rest(options)))  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B, A = U[:, : options.svd_rank] * S[: options.svd_rank], Vh[: options.svd_rank]
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), options.svd_clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A.contiguous(), B.contiguous()


def _rest(options: _Options) -> tuple:
    return options.density, options.sign_method, options.generator
