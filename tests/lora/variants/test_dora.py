"""DoRA against PEFT 0.21: adapters cross both ways, one training step's gradients, merge and unmerge,
an NF4 base, mixed-adapter serving, and the weight norm computed once per step."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import TINY_MODELS, logits_of, perturb
from lorakit.lora import fused_mlp
from lorakit.lora.adapters import lora_layers
from lorakit.lora.mixed import row_adapters
from lorakit.lora.variants import dora
from lorakit.lora.variants.dora import DoraAdapter

TOL = 1e-5
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # GPT-2's Conv1D
    "bert": ["query", "value", "dense"],
}


def _fields(arch: str, **extra) -> dict:
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, **extra)
    if arch == "bert":
        fields["modules_to_save"] = ["classifier"]
    return fields


def _no_dropout(model):
    """GPT-2 and BERT drop activations in train mode; gradients are compared without it."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _peft_name(lorakit_name: str) -> str:
    return (
        lorakit_name.replace(".adapters.default.A", ".lora_A.default.weight")
        .replace(".adapters.default.B", ".lora_B.default.weight")
        .replace(".adapters.default.magnitude", ".lora_magnitude_vector.default.weight")
        .replace(".copies.default.", ".modules_to_save.default.")
    )


def _peft_dora(arch: str, tmp_path, **extra):
    """A PEFT DoRA model with random A, B, magnitude (and head), saved to tmp_path."""
    model = get_peft_model(TINY_MODELS[arch](), PeftLoraConfig(**_fields(arch, **extra), init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path)
    return model.eval()


@pytest.mark.parametrize("arch", list(TARGETS))
def test_a_trained_lorakit_dora_adapter_loads_in_peft_with_the_same_logits(arch, tmp_path, input_ids):
    model = lorakit.inject(TINY_MODELS[arch](), lorakit.LoraConfig(**_fields(arch)))
    start = logits_of(model, input_ids)
    assert torch.allclose(start, logits_of(TINY_MODELS[arch](), input_ids), atol=1e-6)  # m starts at the norm
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=input_ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = logits_of(model.eval(), input_ids)
    assert (expected - start).abs().max() > 1e-3  # it did train
    lorakit.save_adapter(model, tmp_path)

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(TINY_MODELS[arch](), tmp_path).eval()
    assert (logits_of(peft_model, input_ids) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", list(TARGETS))
def test_a_peft_dora_adapter_loads_in_lorakit_with_the_same_logits(arch, tmp_path, input_ids):
    expected = logits_of(_peft_dora(arch, tmp_path), input_ids)
    model = TINY_MODELS[arch]()
    config = lorakit.load_adapter(model, tmp_path)
    assert config.use_dora and isinstance(lora_layers(model)[0][1].adapters["default"], DoraAdapter)
    assert (logits_of(model, input_ids) - expected).abs().max().item() <= TOL


def _lorakit_path(model, path: str) -> None:
    if path == "plain":
        for _, layer in lora_layers(model):
            layer.fused = False
    elif path == "fused-swiglu":
        assert fused_mlp.fuse_swiglu_mlps(model) > 0


@pytest.mark.parametrize(
    "arch, path",
    [("llama", "fused"), ("llama", "plain"), ("llama", "fused-swiglu"), ("gpt2", "fused"), ("gpt2", "plain"),
     ("bert", "fused"), ("bert", "plain")],
)
def test_one_training_step_has_the_gradients_peft_computes(arch, path, tmp_path, input_ids):
    peft_model = _no_dropout(_peft_dora(arch, tmp_path).train())
    model = TINY_MODELS[arch]()
    lorakit.load_adapter(model, tmp_path)
    _no_dropout(model.train())
    _lorakit_path(model, path)
    peft_model(input_ids=input_ids).logits.pow(2).mean().backward()
    model(input_ids=input_ids).logits.pow(2).mean().backward()

    peft_grads = {n.removeprefix("base_model.model."): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {_peft_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(peft_grads)
    assert any(".lora_magnitude_vector." in n for n in ours)
    for name, grad in ours.items():
        assert grad.abs().max() > 0, name
        assert (grad - peft_grads[name]).abs().max().item() <= TOL, name


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_fused_path_with_dropout_is_the_formula_with_the_same_mask(kind):
    """y = W x + b + (c - 1) W drop(x) + c s B A drop(x): gradients of x, A, B and m as autograd's."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else __import__("transformers").pytorch_utils.Conv1D(10, 12)
    layer = lorakit.lora.layer.LoraLayer(base)
    adapter = layer.add_adapter("d", 4, 8.0, dropout=0.3, variant=DoraAdapter, init=False)
    with torch.no_grad():
        adapter.magnitude.mul_(1.3)
    layer.train()
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.manual_seed(5)
    assert layer.can_fuse()
    layer(x).pow(2).sum().backward()
    fused = [t.grad.clone() for t in (x, adapter.A, adapter.B, adapter.magnitude)]

    for t in (x, adapter.A, adapter.B, adapter.magnitude):
        t.grad = None
    torch.manual_seed(5)
    keep = torch.rand_like(x) >= 0.3
    W = layer.weight_as_out_in()
    norm = torch.linalg.vector_norm(W + adapter.scaling * adapter.B.detach() @ adapter.A.detach(), dim=1)
    c = adapter.magnitude / norm
    xd = x * keep / 0.7
    y = x @ W.T + base.bias + (c - 1) * (xd @ W.T) + c * adapter.scaling * (xd @ adapter.A.T @ adapter.B.T)
    y.pow(2).sum().backward()
    for got, want in zip(fused, (x.grad, adapter.A.grad, adapter.B.grad, adapter.magnitude.grad)):
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def _dora_layer(kind: str, p: float, mode: str):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else __import__("transformers").pytorch_utils.Conv1D(10, 12)
    layer = lorakit.lora.layer.LoraLayer(base)
    adapter = layer.add_adapter("d", 4, 8.0, dropout=p, variant=DoraAdapter, init=False, dora_dropout=mode)
    with torch.no_grad():
        adapter.magnitude.mul_(1.3)
    return layer.train(), adapter


def _loss_and_grads(layer, adapter, x, fused: bool):
    layer.fused = fused
    for t in (x, adapter.A, adapter.B, adapter.magnitude):
        t.grad = None
    torch.manual_seed(5)
    loss = layer(x).pow(2).sum()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in (x, adapter.A, adapter.B, adapter.magnitude)]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lowrank_dropout_is_torchtunes_formula_with_the_same_mask(kind):
    """y = c W x + b + c s B A drop(x): the fused and the plain path, loss and gradients of x, A, B and m."""
    layer, adapter = _dora_layer(kind, 0.3, "lowrank")
    assert layer.can_fuse()
    x = torch.randn(2, 5, 12, requires_grad=True)
    fused_loss, fused = _loss_and_grads(layer, adapter, x, fused=True)
    torch.manual_seed(5)
    keep = torch.rand_like(x) >= 0.3  # the fused path's mask

    class SameMask(nn.Dropout):  # the plain path through nn.Dropout, given the same mask
        def forward(self, t):
            return t * keep / (1 - self.p)

    adapter.dropout = SameMask(0.3)
    plain_loss, plain = _loss_and_grads(layer, adapter, x, fused=False)

    for t in (x, adapter.A, adapter.B, adapter.magnitude):
        t.grad = None
    W = layer.weight_as_out_in()
    norm = torch.linalg.vector_norm(W + adapter.scaling * adapter.B.detach() @ adapter.A.detach(), dim=1)
    c = adapter.magnitude / norm
    xd = x * keep / 0.7
    loss = (c * (x @ W.T) + layer.base_layer.bias + c * adapter.scaling * (xd @ adapter.A.T @ adapter.B.T)).pow(2).sum()
    loss.backward()
    want = (x.grad, adapter.A.grad, adapter.B.grad, adapter.magnitude.grad)
    assert all(w.abs().max() > 0 for w in want) and keep.logical_not().any()
    for got_loss, got in ((fused_loss, fused), (plain_loss, plain)):
        assert (got_loss - loss).abs().item() <= 1e-5 * loss.abs().item()
        for g, w in zip(got, want):
            assert (g - w).abs().max().item() <= 1e-5 * w.abs().max().item()


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_lowrank_and_full_dropout_differ_only_where_dropout_is_on(path, input_ids):
    """At dropout 0 the two modes are one model; at dropout 0.3 (same masks) they differ."""
    def grads(mode: str, p: float):
        model = TINY_MODELS["llama"]()
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=p, use_dora=True, dora_dropout=mode))
        perturb(model, std=0.1)  # m away from the norm: c != 1, so the (c - 1) W term counts
        _lorakit_path(model, path)
        model.train()
        torch.manual_seed(3)
        loss = model(input_ids=input_ids).logits.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: t.grad for n, t in model.named_parameters() if t.requires_grad}

    (full_loss, full), (low_loss, low) = grads("full", 0.0), grads("lowrank", 0.0)
    assert (full_loss - low_loss).abs().item() <= 1e-6
    assert any(".magnitude" in n for n in full)
    for name, grad in full.items():
        assert grad.abs().max() > 0 and (grad - low[name]).abs().max().item() <= 1e-6, name
    (full_loss, full), (low_loss, low) = grads("full", 0.3), grads("lowrank", 0.3)
    assert (full_loss - low_loss).abs().item() > 1e-6


def test_a_lowrank_adapter_saves_as_a_plain_peft_dora_adapter(tmp_path, input_ids):
    model = TINY_MODELS["llama"]()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=0.1, use_dora=True, dora_dropout="lowrank"))
    perturb(model, std=0.05)
    expected = logits_of(model.eval(), input_ids)
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and "dora_dropout" not in saved
    peft_model = PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path).eval()
    assert (logits_of(peft_model, input_ids) - expected).abs().max().item() <= TOL


def test_an_unknown_dora_dropout_is_one_config_line(tmp_path):
    from lorakit.config_loading import load_run_config

    with pytest.raises(lorakit.ConfigError, match=r"^lora.dora_dropout: given 'half', expected one of full, lowrank$"):
        lorakit.LoraConfig(use_dora=True, dora_dropout="half")
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  use_dora: true\n  dora_dropout: lowrnak\n")
    with pytest.raises(lorakit.ConfigError) as err:
        load_run_config(path)
    assert str(err.value) == f"{path}:3: lora.dora_dropout: given 'lowrnak', expected one of full, lowrank"
    assert load_run_config(path, ["--lora.dora_dropout", "lowrank"]).lora.dora_dropout == "lowrank"


@pytest.mark.parametrize("arch", list(TARGETS))
def test_merge_and_unmerge_round_trip_and_match_peft_merged_weights(arch, tmp_path, input_ids):
    peft_model = _peft_dora(arch, tmp_path)
    model = TINY_MODELS[arch]()
    lorakit.load_adapter(model, tmp_path)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}
    unmerged = logits_of(model, input_ids)
    lorakit.merge_adapters(model)
    assert (logits_of(model, input_ids) - unmerged).abs().max().item() <= TOL
    merged_peft = peft_model.merge_and_unload()
    for name, layer in lora_layers(model):
        assert (layer.base_layer.weight - merged_peft.get_submodule(name).weight).abs().max().item() <= TOL
    lorakit.unmerge_adapters(model)
    for name, layer in lora_layers(model):
        assert (layer.base_layer.weight - before[name]).abs().max().item() <= 1e-6
    assert (logits_of(model, input_ids) - unmerged).abs().max().item() <= TOL


def test_dora_merged_after_another_adapter_is_normed_on_the_bare_base(input_ids):
    model = TINY_MODELS["llama"]()
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), "plain")
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True), "dora")
    perturb(model, "plain", std=0.05)  # as training would: the magnitude stays near the norm
    perturb(model, "dora", std=0.05, seed=1)
    lorakit.set_adapter(model, ["plain", "dora"])
    both = logits_of(model, input_ids)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}
    lorakit.merge_adapters(model)
    assert (logits_of(model, input_ids) - both).abs().max().item() <= TOL
    lorakit.unmerge_adapters(model)
    for name, layer in lora_layers(model):
        assert (layer.base_layer.weight - before[name]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("strategy", ["stacked", "gathered", "grouped"])
def test_dora_adapters_run_per_row_in_a_mixed_batch(strategy):
    model = TINY_MODELS["llama"]()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True), "d")
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=8), "l")
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=4, use_dora=True), "e")
    for seed, name in enumerate("dle"):
        perturb(model, name, std=0.2, seed=seed)
    names = ["d", None, "l", "e", "d"]
    ids = torch.randint(3, 128, (len(names), 7), generator=torch.Generator().manual_seed(0))
    with row_adapters(model, names, strategy):
        mixed = logits_of(model, ids)
    for row, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                expected = logits_of(model, ids[row : row + 1])
        else:
            lorakit.set_adapter(model, name)
            expected = logits_of(model, ids[row : row + 1])
        assert (mixed[row : row + 1] - expected).abs().max().item() <= TOL, (row, name)


def test_the_weight_norm_is_computed_once_per_optimizer_step(monkeypatch, input_ids):
    """Two micro-batches, gradient checkpointing (a second forward) and the fused SwiGLU: one norm per layer and step."""
    calls = []
    real = dora._row_norm
    monkeypatch.setattr(dora, "_row_norm", lambda *a: calls.append(1) or real(*a))
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, use_dora=True))
    layers = len(lora_layers(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fused_mlp.fuse_swiglu_mlps(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    calls.clear()
    for _ in range(3):
        for micro in (input_ids[:1], input_ids[1:]):
            model(input_ids=micro).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == 2 * layers  # the first step reuses the norm the initialisation computed
    logits_of(model.eval(), input_ids)
    logits_of(model, input_ids)  # decoding: computed once for the new weights, then reused
    assert len(calls) == 3 * layers


def test_dora_on_a_4bit_base_loads_in_peft_on_a_bitsandbytes_base(tmp_path):
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from conftest import TOY_TARGETS, bnb_load, toy_model_folder
    from lorakit.config import QuantizationConfig
    from lorakit.models import load_causal_lm
    from lorakit.quant import quantize_model

    folder = toy_model_folder(tmp_path / "model")
    model = quantize_model(load_causal_lm(folder), QuantizationConfig(bits=4))
    targets = [t for t in TOY_TARGETS if t != "lm_head"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    start = logits_of(model, ids)
    perturb(model, std=0.1)
    trained = logits_of(model, ids)
    assert (trained - start).abs().max() > 1e-2
    lorakit.save_adapter(model, tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(bnb_load(folder, bits=4), tmp_path / "adapter").eval()
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, PeftLinear4bit)
    assert (logits_of(peft_model, ids) - trained).abs().max().item() <= 1e-4


def test_dora_is_refused_on_an_embedding_in_one_line():
    with pytest.raises(lorakit.ConfigError, match="'model.embed_tokens' is a embedding layer; DoraAdapter sits on"):
        lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(target_modules=["embed_tokens"], use_dora=True))


def test_loraplus_trains_the_magnitude_with_b():
    adapter = DoraAdapter(6, 5, 2, 4.0, 0.0, False)
    assert adapter.loraplus_params() == [adapter.B, adapter.magnitude]
