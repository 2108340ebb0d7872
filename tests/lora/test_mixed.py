"""Mixed-adapter batches at the layer level: each row's logits equal those of its adapter alone."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import TINY_MODELS, logits_of, perturb
from lorakit.lora.adapters import lora_layers
from lorakit.lora.mixed import RowAdapters, row_adapters, sibling_layers


def with_adapters(arch: str, ranks: dict[str, int], targets=None):
    model = TINY_MODELS[arch]()
    for seed, (name, r) in enumerate(ranks.items()):
        config = lorakit.LoraConfig(r=r, lora_alpha=(2 + seed) * r, target_modules=targets)  # scalings differ too
        lorakit.inject(model, config, name)
        perturb(model, name, std=0.2, seed=seed)
    return model


def alone(model, name, ids):
    if name is None:
        with lorakit.disable_adapters(model):
            return logits_of(model, ids)
    lorakit.set_adapter(model, name)
    return logits_of(model, ids)


@pytest.mark.parametrize("kernel", ["kernel", "products"])  # lora/column_kernel.py, or the products without it
@pytest.mark.parametrize("ranks", [(4, 8, 2), (4, 4, 4)], ids=["ranks-differ", "ranks-equal"])
@pytest.mark.parametrize("strategy", ["stacked", "gathered", "grouped"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_row_gets_its_own_adapter(arch, strategy, ranks, kernel, monkeypatch):
    monkeypatch.setenv("LORAKIT_COLUMN_KERNEL", "1" if kernel == "kernel" else "0")
    model = with_adapters(arch, dict(zip("abc", ranks)))  # different ranks: zero padding must not matter
    names = ["b", None, "a", "c", "a"]
    ids = torch.randint(3, 128, (len(names), 7), generator=torch.Generator().manual_seed(0))
    with row_adapters(model, names, strategy):
        mixed = logits_of(model, ids)
    for row, name in enumerate(names):
        expected = alone(model, name, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone(model, "a", ids[:1]), alone(model, "b", ids[:1]), atol=1e-3)


def test_embedding_adapters_and_row_selection():
    model = with_adapters("llama", {"a": 4, "b": 4}, targets=["embed_tokens", "q_proj", "down_proj"])
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    with row_adapters(model, ["a", "b", "a"]) as state:
        state.select([2, 1])  # rows leave the batch: the rest keep their adapters
        mixed = logits_of(model, ids[[2, 1]])
    torch.testing.assert_close(mixed[:1], alone(model, "a", ids[2:3]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1:], alone(model, "b", ids[1:2]), rtol=1e-4, atol=1e-5)
    assert all(layer.row_adapters is None for _, layer in lorakit.lora.adapters.lora_layers(model))


def test_refuses_unknown_and_merged_adapters():
    model = with_adapters("llama", {"a": 4})
    with pytest.raises(KeyError, match="no adapter 'zzz'"), row_adapters(model, ["zzz"]):
        pass
    lorakit.merge_adapters(model)
    with pytest.raises(ValueError, match="unmerged"), row_adapters(model, ["a"]):
        pass


@pytest.mark.parametrize("strategy", ["stacked", "gathered"])
def test_in_place_and_autograd_paths_agree(strategy):
    # Without autograd the LoRA term is added in place (baddbmm_ / addmm_); with it, out of place.
    model = with_adapters("llama", {"a": 4, "b": 8})
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    with row_adapters(model, ["a", "b", None], strategy):
        with torch.no_grad():
            in_place = model(ids).logits
        with_grad = model(ids).logits
    torch.testing.assert_close(in_place, with_grad.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_place[:1], alone(model, "a", ids[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["stacked", "gathered"])
def test_siblings_share_one_down_projection_and_survive_row_selection(strategy, monkeypatch):
    monkeypatch.setenv("LORAKIT_COLUMN_KERNEL", "0")  # the products' own state is inspected
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = with_adapters("llama", {"a": 4, "b": 8}, targets=targets)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    with row_adapters(model, ["a", "b", "a"], strategy) as state:
        logits_of(model, ids)
        down = {name: state._rows[id(getattr(attn, name))][0] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        assert down["q_proj"] is down["k_proj"] is down["v_proj"] is not down["o_proj"]
        if strategy == "gathered":
            assert down["q_proj"].A_rows.shape == (3, 32, 3 * 8)  # one copy per row, ranks padded to 8, three siblings
        else:
            assert down["q_proj"].A_rows.shape == (32, 3 * (4 + 8))  # both adapters side by side, three siblings
        assert state._rows[id(mlp.gate_proj)][0] is state._rows[id(mlp.up_proj)][0]
        # A sibling handed a tensor of its own computes its own product.
        x, y = torch.randn(2, 3, 2, 32, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            q_then_k = attn.q_proj(x), attn.k_proj(y)
        state.select([2, 1])
        mixed = logits_of(model, ids[[2, 1]])
    torch.testing.assert_close(mixed[:1], alone(model, "a", ids[2:3]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1:], alone(model, "b", ids[1:2]), rtol=1e-4, atol=1e-5)
    lorakit.set_adapter(model, "b")  # row 1 went through adapter b
    with torch.no_grad():
        torch.testing.assert_close(q_then_k[1][1], attn.k_proj(y[1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(q_then_k[0][1], attn.q_proj(x[1]), rtol=1e-4, atol=1e-5)


def test_auto_stacks_shared_adapters_and_gathers_distinct_ones():
    # stacked reads each adapter once: worth it when rows share adapters; else one copy per row
    from lorakit.lora.mixed import RowAdapters

    assert RowAdapters(["a", "a", "b", "b"]).strategy == "stacked"
    assert RowAdapters(["a", None, "a", "a"]).strategy == "stacked"
    assert RowAdapters(["a", "b", "c", "a"]).strategy == "gathered"
    with pytest.raises(ValueError, match="not one of"):
        RowAdapters(["a"], "fastest")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kernel", ["kernel", "products"])
def test_a_joined_state_computes_what_a_state_built_for_all_its_rows_does(arch, kernel, monkeypatch):
    monkeypatch.setenv("LORAKIT_COLUMN_KERNEL", "1" if kernel == "kernel" else "0")
    model = with_adapters(arch, {"a": 4, "b": 4, "c": 4, "d": 2, "e": 8})
    named = lora_layers(model)
    siblings = sibling_layers(named)
    ids = torch.randint(3, 128, (5, 7), generator=torch.Generator().manual_seed(2))

    def forward(state, rows):
        for _, layer in named:
            layer.row_adapters = state
        try:
            return logits_of(model, ids[rows])
        finally:
            for _, layer in named:
                layer.row_adapters = None

    running = RowAdapters(["a", "b", None], "gathered", siblings)
    joining = RowAdapters(["c", "a"], "gathered", siblings)
    forward(running, [0, 1, 2]), forward(joining, [3, 4])  # each built for its own rows, as prefill and decode do
    assert running.extend(joining)
    assert running.names == ["a", "b", None, "c", "a"]
    built = RowAdapters(running.names, "gathered", siblings)
    torch.testing.assert_close(forward(running, [0, 1, 2, 3, 4]), forward(built, [0, 1, 2, 3, 4]), rtol=0, atol=1e-6)

    stacked = RowAdapters(["a", "a"], "stacked", siblings)
    forward(stacked, [0, 1])
    assert not running.extend(stacked) and running.names == ["a", "b", None, "c", "a"]

    wider, narrower = RowAdapters(["e", "a"], "gathered", siblings), RowAdapters(["d"], "gathered", siblings)
    forward(wider, [0, 1]), forward(narrower, [2])
    assert wider.extend(narrower)  # ranks 8 and 2: the narrower rows' copies are zero-padded
    torch.testing.assert_close(forward(wider, [0, 1, 2]), forward(RowAdapters(["e", "a", "d"], "gathered", siblings),
                                                                   [0, 1, 2]), rtol=0, atol=1e-6)
    alone = RowAdapters(["e"], "gathered", siblings)  # one adapter: its forward never builds per-row copies
    forward(alone, [3])
    assert wider.extend(alone) and wider.names == ["e", "a", "d", "e"]
    torch.testing.assert_close(forward(wider, [0, 1, 2, 3]), forward(RowAdapters(wider.names, "gathered", siblings),
                                                                      [0, 1, 2, 3]), rtol=0, atol=1e-6)


def test_the_kernel_skips_the_terms_of_padding_tokens_only(monkeypatch):
    """A prompt pass's left padding (RowAdapters.padding) gets no LoRA term through the per-column kernel: no token
    attends to it. Every other token gets its row's adapter's term, as without the padding given."""
    from lorakit.lora import column_kernel

    if column_kernel.load() is None:
        pytest.skip("no C compiler here to build the kernel")
    monkeypatch.setenv("LORAKIT_COLUMN_KERNEL", "1")
    model = with_adapters("llama", {"a": 4, "b": 8})
    layer = model.model.layers[0].mlp.down_proj
    names = ["b", "a", None, "a"]
    x = torch.randn(len(names), 6, layer.in_features, generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(len(names), 6, dtype=torch.bool)
    padding[0, :2] = padding[1, :5] = padding[3, :1] = True
    with torch.no_grad(), row_adapters(model, names, "gathered") as state:
        full = layer(x)
        state.padding = padding
        skipped = layer(x)
        state.padding = None
        again = layer(x)
        base = layer.base_layer(x)
    torch.testing.assert_close(skipped[padding], base[padding], rtol=0, atol=0)
    torch.testing.assert_close(skipped[~padding], full[~padding])  # blocks of four columns differ: fp32 rounding
    torch.testing.assert_close(again, full, rtol=0, atol=0)
    assert not torch.allclose(full[padding], base[padding])  # the padding had terms to skip
