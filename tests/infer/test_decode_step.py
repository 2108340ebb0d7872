"""decode_logits: the feature-major decode step of Llama-family models equals the model's own forward
(logits and cache), with plain, half-weight and LoRA projections and per-row adapters; other models and
settings go through the forward."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import VOCAB, perturb, tiny_gpt2, tiny_llama, tiny_qwen2
from lorakit.infer import decode_layer, step_ops
from lorakit.infer.decode_linears import use_decode_linears
from lorakit.infer.decode_step import (
    decode_and_prefill,
    decode_logits,
    lean_decodes,
    lean_prefills,
    prefill_logits,
    through_the_forward,
)
from lorakit.infer.half_weights import use_half_weights
from lorakit.infer.kv_cache import roomy_cache
from lorakit.lora.base import FEW_ROWS
from lorakit.lora.adapters import lora_layers, round_adapter
from lorakit.lora.mixed import RowAdapters, row_adapters, sibling_layers
from lorakit.lora import base, column_kernel, group_kernel
from lorakit.lora import mixed_features
from lorakit.lora.mixed_features import FeatureTerms, features_forward

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prefilled(model, rows: int = 3, width: int = 6, seed: int = 0):
    """A left-padded batch prefilled into a fresh cache: (cache, mask, next positions, next tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    for b in range(rows):
        mask[b, : b % width] = 0  # row b has b pad tokens on its left
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = roomy_cache(model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache).logits
    return cache, mask, position[:, -1:] + 1, logits[:, -1].argmax(-1)


def decode_both(model, steps: int = 3, rows: int = 3):
    """`steps` decode steps through decode_logits and through the model's forward, from the same prefill and
    fed the same tokens; returns both runs' logits per step and their caches. Fails if the lean path was
    not taken."""
    (lean_cache, mask, position, tokens), (plain_cache, *_) = prefilled(model, rows), prefilled(model, rows)
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    got, expected = [], []
    try:
        with torch.no_grad():
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                got.append(decode_logits(model, tokens, mask, position, lean_cache))
                assert not calls, "the decoder layers' forward ran"
                expected.append(model(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=plain_cache
                ).logits[:, -1])
                calls.clear()
                position, tokens = position + 1, expected[-1].argmax(-1)
    finally:
        hook.remove()
    return got, expected, lean_cache, plain_cache


def assert_same(got, expected, lean_cache, plain_cache, atol=1e-5):
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    for a, b in zip(lean_cache.layers, plain_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=atol, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-with-biases"])
def test_the_lean_step_equals_the_forward(build):
    model = build()
    with torch.no_grad():
        assert lean_decodes(model, torch.zeros(3, dtype=torch.long), roomy_cache(model.config))
    assert_same(*decode_both(model))


@pytest.mark.parametrize("step_ops_on", [True, False], ids=["step-ops", "torch"])
def test_the_lean_step_takes_the_step_ops_where_built_and_equals_the_forward_either_way(step_ops_on, monkeypatch):
    if step_ops_on and step_ops._library() is None:
        pytest.skip("no C compiler here to build the kernels")
    monkeypatch.setattr(decode_layer, "serves", lambda rows: False)  # the torch walk, not the layer kernel
    calls = []
    for name in ("rms_norm", "rotate"):
        real = getattr(step_ops, name)
        monkeypatch.setattr(step_ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or (
            _real(*a) if step_ops_on else None))
    model = use_decode_linears(tiny_llama())
    assert_same(*decode_both(model))
    layers, steps = len(model.model.layers), 3
    assert calls.count("rms_norm") == steps * (2 * layers + 1) and calls.count("rotate") == steps * 2 * layers


def test_the_lean_step_equals_the_forward_through_frozen_and_half_weight_linears():
    assert_same(*decode_both(use_decode_linears(tiny_llama())))
    model = tiny_llama()
    assert use_half_weights(model, "bf16") == "bf16"  # as `lorakit serve` prepares its model
    assert_same(*decode_both(use_decode_linears(model)), atol=1e-4)


@pytest.mark.parametrize("strategy", ["gathered", "grouped", "stacked"])
def test_the_lean_step_equals_the_forward_with_per_row_adapters(strategy):
    model = tiny_llama()
    for seed, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + 2 * seed, lora_alpha=8, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
    with row_adapters(model, ["a", None, "b", "a"], strategy):
        got, expected, lean_cache, plain_cache = decode_both(model, rows=4)
    assert_same(got, expected, lean_cache, plain_cache)
    with row_adapters(model, [None] * 4, strategy):
        base, _, _, _ = decode_both(model, steps=1, rows=4)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapters took part


@pytest.mark.parametrize("layout", ["weight", "kernel"])  # bases by BLAS: lanes; by lorakit's kernel: one pass
def test_a_step_over_many_adapters_goes_by_slot_lanes_and_equals_the_forward(layout, monkeypatch):
    if column_kernel.load() is None or (layout == "kernel" and group_kernel.load() is None):
        pytest.skip("no C compiler here to build the kernels")
    monkeypatch.setattr(base, "_layouts", dict.fromkeys(range(1, base.LAYOUT_ROWS + 1), layout))
    model = tiny_llama()
    names = [f"a{k}" for k in range(10)]  # ranks 2 and 3: the lanes read under twice the columns' factors
    for seed, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + seed % 2, lora_alpha=8, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
    rows = [*names, None, "a3"]
    calls, passes = [], []
    plan, plan_pass = column_kernel.lanes_call, group_kernel.group_call

    def counted(*args):
        call = plan(*args)
        return lambda x, ys: calls.append(len(ys)) or call(x, ys)

    def counted_pass(*args):
        call = plan_pass(*args)
        return lambda x, lane: passes.append(len(args[1].terms)) or call(x, lane)

    monkeypatch.setattr(column_kernel, "lanes_call", counted)
    monkeypatch.setattr(group_kernel, "group_call", counted_pass)
    with row_adapters(model, rows, "gathered"):
        got, expected, lean_cache, plain_cache = decode_both(model, rows=len(rows))
    assert_same(got, expected, lean_cache, plain_cache)
    # each step: one call for q/k/v, o, gate/up and down each, by lanes: every projection; with the kernel's bases
    # each of them in one pass, bases and terms, from the first step on
    layers = model.config.num_hidden_layers
    if layout == "weight":
        assert calls == [3, 1, 2, 1] * 3 * layers and not passes
    else:
        assert not calls and passes == [3, 1, 2, 1] * 3 * layers


def test_the_one_pass_steps_are_kept_with_the_factors_until_a_base_weight_is_replaced(monkeypatch):
    if column_kernel.load() is None or group_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernels")
    monkeypatch.setattr(base, "_layouts", dict.fromkeys(range(1, base.LAYOUT_ROWS + 1), "kernel"))
    model = tiny_llama()
    names = [f"a{k}" for k in range(10)]
    for seed, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + seed % 2, lora_alpha=8, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
    made, plan_pass = [], group_kernel.group_call
    monkeypatch.setattr(group_kernel, "group_call", lambda *args: made.append(1) or plan_pass(*args))

    def decode() -> int:
        made.clear()
        with row_adapters(model, [*names, None, "a3"], "gathered"):
            assert_same(*decode_both(model, rows=12, steps=2))
        return len(made)

    assert decode() == 4 * model.config.num_hidden_layers  # q/k/v, o, gate/up and down: each group's pass made
    assert decode() == 0  # the next batch over the same adapters takes them as they are
    o_proj = model.model.layers[1].self_attn.o_proj.base_layer
    o_proj.weight.data = o_proj.weight.detach() * 1.5  # new memory: that group's pass is made again, and follows it
    assert decode() == 1


# bf16: scaling 2, so that s B of bf16 values is one too; int8: scaling 1.75, found again in s B's scales
@pytest.mark.parametrize("dtype, alpha", [(torch.bfloat16, 8), (torch.int8, 7)], ids=["bf16", "int8"])
def test_adapters_rounded_to_a_narrow_type_decode_by_its_lanes_and_equal_the_forward(monkeypatch, dtype, alpha):
    if column_kernel.load(dtype) is None or group_kernel.load(dtype) is None:
        pytest.skip("no C compiler here to build the kernels")
    model = tiny_llama()
    names = [f"a{k}" for k in range(10)]
    for seed, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
        round_adapter(model, name, dtype)
    types = []
    plan, plan_pass = column_kernel.lanes_call, group_kernel.group_call
    monkeypatch.setattr(column_kernel, "lanes_call", lambda kernel, group, *a: types.append(group.AL.dtype)
                        or plan(kernel, group, *a))
    monkeypatch.setattr(group_kernel, "group_call", lambda function, group, *a: types.append(group.AL.dtype)
                        or plan_pass(function, group, *a))
    with row_adapters(model, [*names, None, "a3"], "gathered"):
        got, expected, lean_cache, plain_cache = decode_both(model, rows=12)
    assert_same(got, expected, lean_cache, plain_cache)
    assert types and set(types) == {dtype}  # every sibling group's lanes, in the narrow type


def with_adapters(model, dora_on: str | None = None):
    """Adapters "a" (rank 2) and "b" (rank 4) on every projection, perturbed; `dora_on` a DoRA adapter "d"."""
    for seed, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + 2 * seed, lora_alpha=8, target_modules=TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
    if dora_on:
        lorakit.inject(model, lorakit.LoraConfig(r=2, use_dora=True, target_modules=[dora_on]), "d")
        perturb(model, "d", std=0.3, seed=5)
    return model


def test_dora_layers_run_as_modules_and_the_rest_side_by_side():
    model = with_adapters(tiny_llama(), dora_on="o_proj")
    with row_adapters(model, ["a", "d", "b"], "gathered"):
        assert_same(*decode_both(model))


def test_adapters_on_half_weights_decode_as_through_the_forward():
    model = tiny_llama()
    assert use_half_weights(model, "bf16") == "bf16"
    model = with_adapters(use_decode_linears(model))
    with row_adapters(model, ["a", "b", None], "gathered"):
        assert_same(*decode_both(model), atol=1e-4)


def test_the_next_batch_over_the_same_adapters_builds_nothing_until_one_changes():
    model = with_adapters(tiny_llama())
    q_proj = model.model.layers[0].self_attn.q_proj

    def decode():
        with row_adapters(model, ["a", "b", "a"], "gathered"):
            assert_same(*decode_both(model, steps=2))
        return q_proj.side_by_side

    kept = decode()
    assert decode() is kept
    perturb(model, "b", std=0.3, seed=9)  # trained further, in place
    kept = decode()  # built again, and the new factors decode as the forward does
    assert decode() is kept
    with row_adapters(model, [None, "b", "b"], "gathered"):  # a subset of the kept adapters
        assert_same(*decode_both(model, steps=2))
    if column_kernel.load() is not None:  # with the kernel, the kept factors serve the subset: nothing built
        assert q_proj.side_by_side is kept
    lorakit.delete_adapter(model, "b")  # another adapter under the same name, maybe in the same memory
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "b")
    perturb(model, "b", std=0.3, seed=11)
    perturb(model, "b", std=0.3, seed=12)
    assert decode() is not kept


@pytest.mark.parametrize("kernel", ["kernel", "products"])
def test_siblings_share_one_down_product_per_step(kernel, monkeypatch):
    """Without the per-column kernel, q/k/v (and gate/up) multiply x by their side-by-side A once: per layer
    7 base products and 4 down products, the up products ride on addmm. With it, the base products alone."""
    from torch.profiler import profile

    if kernel == "kernel" and column_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    monkeypatch.setenv("LORAKIT_COLUMN_KERNEL", "1" if kernel == "kernel" else "0")
    from lorakit.lora import base

    # the base products as aten::mm, whatever this process measured fastest (lorakit's product kernel has no op)
    monkeypatch.setattr(base, "_layouts", dict.fromkeys(range(1, base.LAYOUT_ROWS + 1), "weight"))
    model = with_adapters(tiny_llama())
    with row_adapters(model, ["a", "b", "a"], "gathered"):
        cache, mask, position, tokens = prefilled(model)
        mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
        with torch.no_grad(), profile() as prof:
            decode_logits(model, tokens, mask, position, cache)
    counts = {e.key: e.count for e in prof.key_averages()}
    layers = model.config.num_hidden_layers
    if kernel == "kernel":
        assert counts.get("aten::mm") == layers * 7 + 1  # + the head
        assert "aten::addmm_" not in counts
    else:
        assert counts.get("aten::mm") == layers * (7 + 4) + 1
        assert counts.get("aten::addmm_") == layers * 7
    assert "aten::bmm" not in counts


def test_rows_leaving_and_joining_keep_the_side_by_side_factors_while_their_adapters_are_among_them():
    model = with_adapters(tiny_llama())
    model = lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS), "c")
    perturb(model, "c", std=0.3, seed=7)
    names = lora_layers(model)
    siblings = sibling_layers(names)
    layer = names[0][1]

    def term(state):
        x = torch.randn(layer.in_features, len(state.names))
        for _, member in names:
            member.row_adapters = state
        try:
            with torch.no_grad():
                got = features_forward(state, layer, x)
                expected = layer(x.t()[:, None])[:, 0].t()  # the state's own (row-major) path
        finally:
            for _, member in names:
                member.row_adapters = None
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return state.features._layers[id(layer)][0]

    state = RowAdapters(["a", "b", "a"], "gathered", siblings)
    kept = term(state)
    state.select([0, 2])  # only "a" rows are left
    assert term(state) is kept
    state.extend(RowAdapters(["b"], "gathered", siblings))  # "b" comes back: still among the kept
    assert term(state) is kept
    state.extend(RowAdapters(["c"], "gathered", siblings))  # a new adapter: built again
    assert term(state) is not kept
    if column_kernel.load() is None:
        return
    # with the kernel, an adapter once seen stays kept: rows of "d" alone, then "a" back, build only for "d"
    model = lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS), "d")
    perturb(model, "d", std=0.3, seed=8)
    names = lora_layers(model)
    siblings = sibling_layers(names)
    layer = names[0][1]
    features = FeatureTerms()
    built = []
    for rows in (["a", "b", "c"], ["d"], ["d", "a"], ["b", "c"]):  # as a running batch's states, one after another
        state = RowAdapters(rows, "gathered", siblings)
        state.features = features
        built.append(term(state))
    assert built[1] is not built[0] and built[3] is built[2] is built[1]
    assert features.adapters == ["a", "b", "c", "d"]


PROMPTS = [[5, 9, 11, 4], [7, 3], [8, 40, 8, 2, 6, 100, 9]]


def prefill_beside_a_step(model, names=None, prompt_names=None, strategy="stacked"):
    """decode_and_prefill's outputs for 3 rows and PROMPTS (rows with adapters `names`, prompts with
    `prompt_names`), and the same from the model's forward: the rows' step, then each prompt alone."""
    (lean_cache, mask, position, tokens), (plain_cache, *_) = prefilled(model), prefilled(model)
    mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
    names, prompt_names = names or [None] * 3, prompt_names or [None] * len(PROMPTS)
    columns = names + [name for name, prompt in zip(prompt_names, PROMPTS) for _ in prompt]
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad(), row_adapters(model, columns, strategy):
            got = decode_and_prefill(model, tokens, mask, position, lean_cache, PROMPTS)
    finally:
        hook.remove()
    assert not calls, "the decoder layers' forward ran"
    own = []
    with torch.no_grad():
        with row_adapters(model, names, strategy):
            step = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                         past_key_values=plain_cache).logits[:, -1]  # fmt: skip
        for name, prompt in zip(prompt_names, PROMPTS):
            cache = roomy_cache(model.config)
            with row_adapters(model, [name], strategy):
                logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache).logits[0, -1]
            own.append((logits, cache))
    return got, (step, lean_cache, plain_cache, own)


def assert_prefilled_as_alone(got, expected, atol=1e-5):
    (logits, prompt_logits, prompt_cache, prompt_mask), (step, lean_cache, plain_cache, own) = got, expected
    assert_same([logits], [step], lean_cache, plain_cache, atol=atol)
    width = max(map(len, PROMPTS))
    assert prompt_mask.tolist() == [[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS]
    for j, (prompt, (alone, cache)) in enumerate(zip(PROMPTS, own)):
        torch.testing.assert_close(prompt_logits[j], alone, atol=atol, rtol=1e-5)
        for mine, theirs in zip(prompt_cache.layers, cache.layers):
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                torch.testing.assert_close(a[j, :, width - len(prompt) :], b[0], atol=atol, rtol=1e-5)
                assert not a[j, :, : width - len(prompt)].any()  # zeros on the left


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-with-biases"])
def test_prompts_prefilled_beside_a_step_equal_the_step_and_each_prompt_alone(build):
    assert_prefilled_as_alone(*prefill_beside_a_step(build()))


@pytest.mark.parametrize("strategy", ["gathered", "stacked"])
def test_prompts_prefilled_beside_a_step_take_their_own_adapters(strategy):
    model = with_adapters(tiny_llama(), dora_on="o_proj")
    got, expected = prefill_beside_a_step(model, ["a", None, "d"], ["b", "a", "d"], strategy)
    assert_prefilled_as_alone(got, expected)
    with torch.no_grad(), row_adapters(model, [None], strategy):
        base = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert not torch.allclose(got[1][0], base, atol=1e-3)  # the prompt's adapter took part


@pytest.mark.parametrize("strategy", ["gathered", "stacked"])
def test_prompts_prefilled_on_their_own_equal_each_prompt_alone(strategy):
    """prefill_logits: the prompts side by side, no padding computed, each with its adapter (a DoRA one too)."""
    model = with_adapters(tiny_llama(), dora_on="o_proj")
    prompts = [*PROMPTS, list(range(3, 23)), [4, 5]]  # more columns than a decode step's: by runs of one adapter
    assert sum(map(len, prompts)) > mixed_features._SEGMENT_COLUMNS
    names = ["b", None, "d", "a", "a"]
    columns = [name for name, prompt in zip(names, prompts) for _ in prompt]
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad(), row_adapters(model, columns, strategy):
            logits, cache, mask = prefill_logits(model, prompts)
    finally:
        hook.remove()
    assert not calls, "the decoder layers' forward ran"
    width = max(map(len, prompts))
    assert logits.shape[0] == len(prompts) and cache.layers[0].keys.shape[2] == width
    assert mask.tolist() == [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    for j, (name, prompt) in enumerate(zip(names, prompts)):
        alone = roomy_cache(model.config)
        with torch.no_grad(), row_adapters(model, [name], strategy):
            expected = model(input_ids=torch.tensor([prompt]), past_key_values=alone).logits[0, -1]
        torch.testing.assert_close(logits[j], expected, atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(cache.layers, alone.layers):  # values up to ~12 here: fp32 rounding to ~1e-4
            torch.testing.assert_close(mine.keys[j, :, width - len(prompt) :], theirs.keys[0], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(mine.values[j, :, width - len(prompt) :], theirs.values[0], atol=1e-4, rtol=1e-5)
            assert not mine.keys[j, :, : width - len(prompt)].any()


def test_a_prompt_pass_adds_every_projections_terms_by_runs(monkeypatch):
    """o_proj's input (the attention's output, a transposed view) too: its columns copied contiguous once, for the
    base product and the runs."""
    if column_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernels")
    model = with_adapters(tiny_llama())
    prompts = [list(range(3, 23)), list(range(5, 25))]
    segments, by_column = [], []
    add_segments, per_column = column_kernel.add_segments, FeatureTerms._by_column
    monkeypatch.setattr(column_kernel, "add_segments", lambda *args: segments.append(1) or add_segments(*args))
    monkeypatch.setattr(FeatureTerms, "_by_column", lambda *args: by_column.append(1) or per_column(*args))
    with torch.no_grad(), row_adapters(model, ["a"] * 20 + ["b"] * 20, "gathered"):
        logits, _, _ = prefill_logits(model, prompts)
    assert len(segments) == len(TARGETS) * model.config.num_hidden_layers and not by_column
    for j, name in enumerate(["a", "b"]):
        with torch.no_grad(), row_adapters(model, [name], "gathered"):
            expected = model(input_ids=torch.tensor([prompts[j]])).logits[0, -1]
        torch.testing.assert_close(logits[j], expected, atol=1e-5, rtol=1e-5)


def test_other_models_and_settings_go_through_the_forward():
    gpt2, llama = tiny_gpt2(), tiny_llama()
    tokens, cache = torch.zeros(3, dtype=torch.long), roomy_cache(llama.config)
    with torch.no_grad():
        assert not lean_decodes(gpt2, tokens, roomy_cache(gpt2.config))
        assert lean_decodes(llama, tokens, cache)
        assert not lean_decodes(llama, torch.zeros(FEW_ROWS + 1, dtype=torch.long), cache)
        llama.train()
        assert not lean_decodes(llama, tokens, cache)
    llama.eval()
    assert not lean_decodes(llama, tokens, cache)  # autograd on
    with torch.no_grad():
        assert lean_prefills(llama) and not lean_prefills(gpt2)
        with through_the_forward():
            assert not lean_decodes(llama, tokens, cache) and not lean_prefills(llama)
