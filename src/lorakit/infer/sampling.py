"""Pick the next token of each row: greedy, or temperature and top-p (nucleus) sampling per row."""

from __future__ import annotations

import torch


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities over the smallest set of tokens whose mass reaches `top_p`, at `temperature`. Scores that are
    not finite count as the lowest (NaN) or the highest float (+inf), so that one row's overflow never stops a batch.

    Args:
        logits: (V,) scores of one row.
    Returns:
        (V,) probabilities, zero outside the nucleus (the most likely token is always kept).
    """
    scores = logits.float()
    if not bool(torch.isfinite(scores).all()):  # scores that overflowed (an adapter's huge weights): this row's
        scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max)  # pick, not a failure
        if not bool(torch.isfinite(scores).any()):
            scores = torch.zeros_like(scores)  # nothing left to rank: every token alike
    # the best score moved to 0 before dividing: a tiny temperature sends the others to -inf, never the best to +inf
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    outside = mass_before >= top_p
    outside[0] = False  # a top_p that rounds to 0 in float32 still keeps the most likely token
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def next_tokens(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row.

    Args:
        logits: (B, V) scores of the last position.
        temperatures: per row; 0 means greedy (argmax, as transformers' greedy search).
        top_ps: per row, in (0, 1].
        generators: per row; each sampled row draws from its own generator, so its tokens do not
            depend on which other requests share the batch.
    Returns:
        (B,) token ids.
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    for i, temperature in enumerate(temperatures):
        if temperature > 0:
            probs = nucleus_probs(logits[i], temperature, top_ps[i])
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens
