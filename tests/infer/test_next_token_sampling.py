"""Per-row next-token choice: greedy rows take the argmax, sampled rows keep to their nucleus."""

from __future__ import annotations

import torch

from lorakit.infer.sampling import next_tokens, nucleus_probs


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    probs = nucleus_probs(logits, temperature=1.0, top_p=0.75)
    assert probs.nonzero().flatten().tolist() == [1, 2]  # 0.5 + 0.3 reaches 0.75; 0.5 alone does not
    assert nucleus_probs(logits, 1.0, 0.1).nonzero().flatten().tolist() == [1]  # the top token always stays
    assert torch.allclose(nucleus_probs(logits, 1.0, 1.0), logits.softmax(-1))


def test_rows_choose_independently():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    gens = [None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    draws = [next_tokens(logits, [0.0, 1.0, 2.0], [1.0, 0.5, 1.0], gens).tolist() for _ in range(20)]
    assert all(d[0] == 1 for d in draws)  # greedy
    assert all(d[1] == 1 for d in draws)  # top_p 0.5: only the top token is in the nucleus
    assert len({d[2] for d in draws}) > 1  # hot sampling does vary


def test_a_row_whose_scores_overflowed_picks_a_token_and_leaves_the_others_as_they_were():
    """A row of NaN and infinite scores (an adapter whose outputs overflowed) gets a token of its own; the other rows
    draw exactly what they draw without it, from their own generators."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    broken = logits.clone()
    broken[1] = float("nan")
    broken[1, 7] = float("inf")
    broken[2, :10] = float("-inf")  # finite elsewhere: ranked as before

    def picks(scores):
        generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        return next_tokens(scores, [0.8, 0.8, 0.8], [0.9, 0.9, 0.9], generators)

    clean, got = picks(logits), picks(broken)
    assert got[0] == clean[0] and got[1] == 7 and 10 <= got[2] < 50
    nothing = torch.full((1, 50), float("nan"))
    assert 0 <= next_tokens(nothing, [1.0], [1.0], [torch.Generator().manual_seed(0)])[0] < 50


def test_extreme_but_valid_settings_stay_a_distribution_around_the_best_token():
    """A top_p that rounds to 0 in float32 used to zero every token (torch.multinomial then failed the whole
    batch), and a temperature near the float minimum sent the best score to +inf, tied with others (random text)."""
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for top_p in (1e-46, 1e-30):  # zero outside the nucleus (torch.multinomial normalises the rest)
        probs = nucleus_probs(logits, 1.0, top_p)
        assert probs.nonzero().flatten().tolist() == [1]
    for temperature in (1e-38, 1e-45):
        probs = nucleus_probs(logits, temperature, 1.0)
        assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    generator = torch.Generator().manual_seed(0)
    picked = next_tokens(logits[None].repeat(2, 1), [1e-45, 1.0], [1.0, 1e-46], [generator, generator])
    assert picked.tolist() == [1, 1]
