"""Continuous batching: requests join a running batch between steps and leave when done; each row's
output equals generating it alone (greedy: with its adapter merged; sampled: with its own seed)."""

from __future__ import annotations

import pytest
from test_multi_adapter import NAMES, PROMPTS, loaded, merged_model, merged_output, toy  # noqa: F401

from lorakit.infer import continuous
from lorakit.infer.continuous import RunningBatch
from lorakit.infer.multi_adapter import Request, generate_mixed


class Collect:
    """on_text / on_done for one row: the streamed text, the completion, and a cancel switch."""

    def __init__(self, cancel_after: int | None = None):
        self.pieces, self.done, self.cancel_after = [], None, cancel_after

    def text(self, piece: str) -> bool:
        self.pieces.append(piece)
        return self.cancel_after is None or len(self.pieces) < self.cancel_after

    def finish(self, completion) -> None:
        assert self.done is None
        self.done = completion


def run(batch: RunningBatch, arrivals: dict[int, list[tuple[Request, Collect]]]) -> int:
    """Step the batch; at step s the requests of arrivals[s] join. Returns the steps taken."""
    steps = 0
    while len(batch) or any(s >= steps for s in arrivals):
        joining = arrivals.get(steps, [])
        if joining:
            batch.join([r for r, _ in joining], [c.text for _, c in joining], [c.finish for _, c in joining])
        batch.step()
        steps += 1
    return steps


@pytest.mark.parametrize("strategy", ["auto", "gathered", "grouped"])
def test_rows_joining_mid_decode_equal_merged_single_requests(toy, strategy):  # noqa: F811
    folder, root = toy
    tokenizer, model = loaded(toy, NAMES)
    plan = [  # (step it arrives, adapter, prompt, max_tokens)
        (0, "a", 0, 12), (0, "b", 1, 5), (2, None, 2, 9), (2, "c", 3, 12), (3, "d", 4, 3),
        (7, "a", 5, 7), (7, "b", 2, 12), (20, "d", 0, 10), (21, "c", 1, 4),
    ]
    rows, arrivals = [], {}
    for step, adapter, prompt, max_tokens in plan:
        request = Request(tokenizer(PROMPTS[prompt])["input_ids"], adapter, max_tokens)
        rows.append(Collect())
        arrivals.setdefault(step, []).append((request, rows[-1]))
    batch = RunningBatch(model, tokenizer, strategy)
    run(batch, arrivals)
    merged = {name: merged_model(folder, name and root / name) for name in [None, *NAMES]}
    expected = [merged_output(merged[a], tokenizer, PROMPTS[p], n) for _, a, p, n in plan]
    assert [c.done.text.strip() for c in rows] == expected
    assert all("".join(c.pieces) == c.done.text for c in rows)  # streamed text adds up to the completion
    assert len(batch) == 0 and batch.cache is None
    assert len({c.done.text for c in rows}) > 3  # the adapters do differ


def test_sampled_rows_do_not_depend_on_their_company(toy):  # noqa: F811
    tokenizer, model = loaded(toy, NAMES[:2])
    requests = [
        Request(tokenizer(PROMPTS[i])["input_ids"], NAMES[i % 2], 10, temperature=0.9, top_p=0.9, seed=i,
                ignore_eos=True)
        for i in range(4)
    ]
    alone = [generate_mixed(model, tokenizer, [r])[0].token_ids for r in requests]
    rows = [Collect() for _ in requests]
    batch = RunningBatch(model, tokenizer)
    run(batch, {0: [(requests[0], rows[0])], 3: [(requests[1], rows[1]), (requests[2], rows[2])],
                4: [(requests[3], rows[3])]})
    assert [c.done.token_ids for c in rows] == alone


def test_cancelled_rows_leave_and_the_cache_shrinks(toy):  # noqa: F811
    tokenizer, model = loaded(toy, NAMES[:2])
    long_prompt = tokenizer(" ".join(PROMPTS))["input_ids"]
    short = tokenizer(PROMPTS[3])["input_ids"]
    batch = RunningBatch(model, tokenizer)
    quitter, stayer = Collect(cancel_after=2), Collect()
    batch.join([Request(long_prompt, "a", 30, ignore_eos=True), Request(short, "b", 12, ignore_eos=True)],
               [quitter.text, stayer.text], [quitter.finish, stayer.finish])
    assert batch.mask.shape[1] == len(long_prompt)
    batch.step()
    assert quitter.done.finish_reason == "cancelled" and len(batch) == 1
    assert batch.mask.shape[1] == len(short) + 1 == batch.cache.layers[0].keys.shape[2]  # padding cut away
    while len(batch):
        batch.step()
    assert stayer.done.finish_reason == "length" and len(stayer.done.token_ids) == 12
    alone = generate_mixed(model, tokenizer, [Request(short, "b", 12, ignore_eos=True)])[0]
    assert stayer.done.token_ids == alone.token_ids


def test_a_row_joining_a_gathered_batch_extends_its_adapter_state(toy, monkeypatch):  # noqa: F811
    """Where decode steps run through the model's forward (per-row copies), joiners' copies are appended."""
    monkeypatch.setattr(continuous, "lean_decodes", lambda *args: False)
    monkeypatch.setattr(continuous, "lean_prefills", lambda *args: False)
    tokenizer, model = loaded(toy, NAMES)
    batch = RunningBatch(model, tokenizer, "gathered")
    ask = [Request(tokenizer(PROMPTS[p])["input_ids"], a, 6) for p, a in [(0, "a"), (1, "b"), (2, "c")]]
    rows = [Collect() for _ in ask]
    batch.join(ask[:2], [c.text for c in rows[:2]], [c.finish for c in rows[:2]])
    state = batch._state
    assert state is not None and state.names == ["a", "b"]  # the prefill's state decodes on
    batch.step()
    batch.join(ask[2:], [rows[2].text], [rows[2].finish])
    assert batch._state is state and state.names == ["a", "b", "c"]  # extended, not rebuilt
    while len(batch):
        batch.step()
    assert all(c.done is not None and len(c.done.token_ids) > 0 for c in rows)


def test_rows_joining_a_lean_batch_keep_its_side_by_side_factors(toy):  # noqa: F811
    """Decoding feature-major (infer/decode_step.py), a join makes no per-row copies: the side-by-side
    factors outlive the batch's state while the joiners' adapters are among them, and an adapter that
    left lately stays among them."""
    tokenizer, model = loaded(toy, NAMES)
    batch = RunningBatch(model, tokenizer)
    plan = [(0, "a", 12), (1, "b", 2), (2, "c", 6), (3, "b", 4)]
    ask = [Request(tokenizer(PROMPTS[p])["input_ids"], a, n, ignore_eos=True) for p, a, n in plan]
    rows = [Collect() for _ in ask]

    def join(i):
        batch.join(ask[i : i + 1], [rows[i].text], [rows[i].finish])

    join(0)
    join(1)
    batch.step()  # "b" is done
    features = batch._state.features
    assert batch.adapters() == ["a"] and features.adapters == ["a", "b"]
    join(2)  # "c" is new: built again, for "c" and the two before
    batch.step()
    built = dict(features._layers)
    assert built and features.adapters == ["a", "b", "c"]
    join(3)  # "b" again: nothing is built
    batch.step()
    assert batch._state.features is features and features._layers == built
    while len(batch):
        batch.step()
    assert [len(c.done.token_ids) for c in rows] == [n for _, _, n in plan]


def test_a_prompt_pass_of_its_own_takes_the_batchs_kept_factors(toy, monkeypatch):  # noqa: F811
    """A join prefilled in a forward pass of its own (an idle batch, or prefill="apart") uses the batch's
    side-by-side factors, valid until adapters_changed(): it neither builds them again nor re-reads every
    adapter's parameters to check them; its rows keep their merged outputs."""
    from lorakit.lora import side_by_side

    folder, root = toy
    tokenizer, model = loaded(toy, NAMES)
    batch = RunningBatch(model, tokenizer, prefill="apart")

    def serve(plan):
        ask = [Request(tokenizer(PROMPTS[p])["input_ids"], a, 3, ignore_eos=True) for p, a in plan]
        rows = [Collect() for _ in ask]
        batch.join(ask, [c.text for c in rows], [c.finish for c in rows])
        while len(batch):
            batch.step()
        return [c.done.text for c in rows]

    serve([(0, "a"), (1, "b")])
    features, checks = batch._features, []
    monkeypatch.setattr(side_by_side.KeptFactors, "holds", lambda kept, present: checks.append(kept) or True)
    plan = [(2, "b"), (3, "a")]
    texts = serve(plan)
    assert checks == [] and batch._features is features
    assert texts == [merged_output(merged_model(folder, root / a), tokenizer, PROMPTS[p], 3) for p, a in plan]
    batch.adapters_changed()  # adapters loaded or unloaded: the next join checks the kept factors
    serve(plan)
    assert checks


@pytest.mark.parametrize("prefill", ["beside", "apart"])
def test_a_request_joining_a_lean_batch_is_prefilled_in_the_decode_steps_pass(toy, prefill):  # noqa: F811
    """Rows decoding through lorakit's step: a joiner's prompt rides in the pass that decodes the running
    rows (the model's forward never runs), which advances them a token; both keep their merged outputs.
    With prefill="apart" the joiner has a forward pass of its own and the rows wait."""
    folder, root = toy
    tokenizer, model = loaded(toy, NAMES)
    batch = RunningBatch(model, tokenizer, prefill=prefill)
    plan = [("a", 0, 6), ("b", 1, 5), ("c", 2, 4)]
    ask = [Request(tokenizer(PROMPTS[p])["input_ids"], a, n) for a, p, n in plan]
    rows = [Collect() for _ in ask]
    batch.join(ask[:1], [rows[0].text], [rows[0].finish])
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        batch.join(ask[1:], [c.text for c in rows[1:]], [c.finish for c in rows[1:]])
    finally:
        hook.remove()
    if prefill == "beside":
        assert not calls and len(rows[0].pieces) == 2  # its first token at its join, its second beside the prompts
    else:
        assert calls and len(rows[0].pieces) == 1
    assert [len(c.pieces) for c in rows[1:]] == [1, 1] and len(batch) == 3
    while len(batch):
        batch.step()
    merged = {name: merged_model(folder, root / name) for name, _, _ in plan}
    with pytest.raises(ValueError, match="prefill 'chunked'"):
        RunningBatch(model, tokenizer, prefill="chunked")
    expected = [merged_output(merged[a], tokenizer, PROMPTS[p], n) for a, p, n in plan]
    assert [c.done.text.strip() for c in rows] == expected
