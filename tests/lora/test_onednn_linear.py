"""oneDNN's fp32 linear for a prompt's rows: equal to F.linear to float rounding, taken by decode_linear for many rows
without autograd where it is the faster one here, and left out on request."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from lorakit.lora import base, onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear_for_rows_of_any_layout(bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    x = torch.randn(3, 70, 24, generator=generator)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double()).float()
    got = onednn_linear.linear(x, weight, b)
    assert got.shape == (3, 70, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    strided = onednn_linear.linear(x.transpose(0, 1).contiguous().transpose(0, 1), weight, b)  # copied, same rows
    assert torch.equal(strided, got)


def test_decode_linear_takes_it_for_many_rows_without_autograd(monkeypatch):
    calls = []
    real = onednn_linear.linear
    monkeypatch.setattr(onednn_linear, "linear", lambda *args: calls.append(args[0].shape) or real(*args))
    monkeypatch.setattr(onednn_linear, "faster", lambda: True)
    weight = torch.randn(16, 8)
    many = torch.randn(2, base.FEW_ROWS, 8)  # more rows than a decode step's
    with torch.no_grad():
        out = base.decode_linear(many, weight, None)
        base.decode_linear(torch.randn(4, 8), weight, None)  # a decode step's rows: the product kernel's way
    assert calls == [many.shape]
    torch.testing.assert_close(out, F.linear(many, weight), rtol=1e-5, atol=1e-5)
    base.decode_linear(many.requires_grad_(), weight, None)  # under autograd: F.linear
    assert len(calls) == 1
    monkeypatch.setattr(onednn_linear, "faster", lambda: False)  # MKL faster on this CPU
    with torch.no_grad():
        base.decode_linear(many, weight, None)
    assert len(calls) == 1


def test_left_out_on_request(monkeypatch):
    monkeypatch.setenv("LORAKIT_ONEDNN_LINEAR", "0")
    assert not onednn_linear.available()


def test_faster_is_the_one_that_won_the_timing(monkeypatch):
    def slow(*args):
        time.sleep(0.1)  # far slower than either product

    monkeypatch.setattr(onednn_linear, "linear", slow)
    assert onednn_linear.measure_faster(rounds=1) is False
    monkeypatch.setattr(onednn_linear, "linear", lambda *args: None)
    monkeypatch.setattr(onednn_linear.F, "linear", slow)
    assert onednn_linear.measure_faster(rounds=1) is True


def test_faster_is_timed_once_per_machine_and_read_back_by_every_process(monkeypatch):
    """The first process to ask times it; later ones (here: a fresh process) read its answer, whatever their
    own timing would say, so that every process on the machine computes alike."""
    try:
        onednn_linear.faster.cache_clear()
        monkeypatch.setattr(onednn_linear, "measure_faster", lambda: "timed here")
        assert onednn_linear.faster() == "timed here"
    finally:
        onednn_linear.faster.cache_clear()  # asked again, on the real timing, when next needed
    script = "from lorakit.lora import onednn_linear; print(onednn_linear.faster())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "timed here"


def test_input_grad_equals_the_float64_product_for_grads_of_any_layout():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 24, generator=generator)  # (out, in)
    grad = torch.randn(3, 70, 40, generator=generator)
    want = (grad.double() @ weight.double()).float()
    got = onednn_linear.input_grad(grad, weight)
    assert got.shape == (3, 70, 24) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(onednn_linear.input_grad(grad.transpose(0, 1).contiguous().transpose(0, 1), weight), got)


def _fused_step(onednn: bool, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Loss and LoRA gradients of one fused training step of a tiny Llama over 2 x 40 tokens (more rows than
    FEW_ROWS), every projection adapted, with oneDNN taken or not; and the oneDNN products it ran."""
    import lorakit
    from lorakit.train.lean import use_fused_paths
    from conftest import TINY_MODELS

    calls = []
    real_linear, real_grad = onednn_linear.linear, onednn_linear.input_grad
    monkeypatch.setattr(onednn_linear, "linear", lambda *a: calls.append("linear") or real_linear(*a))
    monkeypatch.setattr(onednn_linear, "input_grad", lambda *a: calls.append("input_grad") or real_grad(*a))
    monkeypatch.setattr(onednn_linear, "faster", lambda: onednn)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, target_modules=targets,
                                                                      init_lora_weights=False)).train()
    assert use_fused_paths(model)["fused_mlps"] > 0
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad], calls


def test_a_fused_training_step_multiplies_fp32_through_it_where_faster_with_the_same_loss_and_gradients(monkeypatch):
    loss, grads, calls = _fused_step(True, monkeypatch)
    assert {"linear", "input_grad"} <= set(calls)  # forward and backward products both went through oneDNN
    plain_loss, plain_grads, plain_calls = _fused_step(False, monkeypatch)
    assert plain_calls == []
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
