"""Half-precision frozen base: the probe, the cast, and a loss curve within 1% of fp32's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.lora.adapters import lora_layers
from lorakit.train import half_base
from lorakit.train.lean import use_fused_paths
from lorakit.train.loop import accumulate_gradients
from lorakit.train.objectives import CausalLMObjective
from conftest import TINY_MODELS, VOCAB


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _curve(half: str, steps: int = 40) -> tuple[list[float], dict]:
    """Every projection adapted, so the fused MLP (keeping its gate/up output in the half type) is on the curve."""
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=8, lora_alpha=16,
                                                                      target_modules=ALL_PROJECTIONS))
    model.train()
    applied = use_fused_paths(model, half_base=half)
    objective = CausalLMObjective(pad_token_id=0)
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(3, VOCAB // 4, (8, 24), generator=generator)  # a small vocabulary: learnable in 40 steps
    batch = {"input_ids": rows, "labels": rows.clone(), "attention_mask": torch.ones_like(rows)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        losses.append(accumulate_gradients(model, [batch], objective))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, applied


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_half_base_loss_curve_stays_within_one_percent_of_fp32(half):
    fp32, applied32 = _curve("off")
    halved, applied = _curve(half)
    assert applied32["half_base"] is None and applied["half_base"] == half
    assert fp32[-1] < 0.95 * fp32[0]  # it learns: the bound is tested on a moving curve
    gaps = [abs(a - b) / a for a, b in zip(fp32, halved)]
    assert max(gaps) <= 0.01, f"largest relative gap {max(gaps):.4f} at step {gaps.index(max(gaps))}"
    assert halved != fp32  # the base really ran in the half type


def test_the_fused_mlp_of_a_half_base_keeps_its_gate_up_output_in_the_half_type(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, target_modules=ALL_PROJECTIONS))
    use_fused_paths(model, half_base="bf16")
    intermediate = model.config.intermediate_size
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    gate_up = [t for t in saved if t.shape == (*input_ids.shape, 2 * intermediate)]
    assert len(gate_up) == model.config.num_hidden_layers and all(t.dtype == torch.bfloat16 for t in gate_up)


def test_only_frozen_bases_change_type():
    model = lorakit.inject(TINY_MODELS["qwen2"](), lorakit.LoraConfig(r=4))
    assert use_fused_paths(model, half_base="fp16")["half_base"] == "fp16"
    for _, layer in lora_layers(model):
        assert layer.base_layer.weight.dtype == torch.float16 and layer.base_layer.bias in (None,) or \
            layer.base_layer.bias.dtype == torch.float16
        assert all(p.dtype == torch.float32 for p in layer.adapters.parameters())
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    group = model.model.layers[0].self_attn.q_proj.sibling_group
    assert group.weight.dtype == torch.float16 and group.applies()  # packed after the cast


def test_auto_follows_the_probe_and_off_never_casts(monkeypatch):
    monkeypatch.setenv("LORAKIT_RETIME", "1")  # each probe below is asked, not the first one's answer
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=2))
    assert use_fused_paths(model, half_base="off")["half_base"] is None
    assert use_fused_paths(model, half_base="auto")["half_base"] is None  # too small to time: fp32
    monkeypatch.setattr(half_base, "MIN_PROBED_WEIGHT", 0)
    monkeypatch.setattr(half_base, "probe_half_type", lambda i, o, rows: (None, {}))
    assert use_fused_paths(model, half_base="auto")["half_base"] is None
    assert all(layer.base_layer.weight.dtype == torch.float32 for _, layer in lora_layers(model))
    monkeypatch.setattr(half_base, "probe_half_type", lambda i, o, rows: ("bf16", {}))
    assert use_fused_paths(model, half_base="auto")["half_base"] == "bf16"


def test_auto_is_probed_once_per_machine_and_read_back_by_every_process(monkeypatch):
    monkeypatch.setattr(half_base, "probe_half_type", lambda i, o, rows: ("fp16", {}))
    assert half_base.auto_half_type(1024, 1024, 16) == "fp16"
    script = ("from lorakit.train import half_base\n"
              "half_base.probe_half_type = lambda i, o, rows: (None, {})  # this process's own timing disagrees\n"
              "print(half_base.auto_half_type(1024, 1024, 16), half_base.auto_half_type(1024, 2048, 16))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["fp16", "None"]  # the first process's answer; another shape is timed anew


def test_probe_times_the_three_types_and_picks_only_a_faster_half():
    choice, seconds = half_base.probe_half_type(64, 96)
    assert set(seconds) == {"fp32", "fp16", "bf16"} and all(s > 0 for s in seconds.values())
    if choice is not None:
        assert seconds[choice] <= half_base.HALF_MARGIN * seconds["fp32"]


def test_unfused_paths_of_a_half_base_answer_in_fp32(input_ids):
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        use_fused_paths(model, half_base="fp16")
        fused = model(input_ids=input_ids).logits
        with lorakit.disable_adapters(model):
            assert model(input_ids=input_ids).logits.dtype == torch.float32
        for _, layer in lora_layers(model):
            layer.fused = False
        plain = model(input_ids=input_ids).logits
    assert torch.allclose(fused, expected, atol=1e-2) and torch.allclose(plain, fused, atol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/maps")
def test_a_half_base_loaded_from_safetensors_leaves_the_file_mapping(tmp_path):
    """The fp32 pages of a memory-mapped weights file would stay resident beside the half copies."""
    from lorakit.mapped_pages import file_mappings
    from lorakit.models import load_causal_lm

    TINY_MODELS["llama"]().save_pretrained(tmp_path)  # model.safetensors
    model = load_causal_lm(tmp_path)

    def in_file() -> int:
        ranges = file_mappings()
        return sum(any(a <= t.data_ptr() < b for a, b in ranges) for t in [*model.parameters(), *model.buffers()])

    assert in_file() > 0  # loaded through the memory map: the test can fail
    model = lorakit.inject(model, lorakit.LoraConfig(r=4))
    assert use_fused_paths(model, half_base="bf16")["half_base"] == "bf16"
    assert in_file() == 0


def _choose_in_process(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    import time

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def probe(i, o, rows):
        if rank:
            raise AssertionError("rank 1 timed the half type: only rank 0 reads or times it")
        return "bf16", {}

    half_base.probe_half_type = probe
    if rank == 0:
        time.sleep(1.0)  # rank 0 asks last: a kept answer of another rank, written meanwhile, must not be taken
    out.put((rank, half_base.auto_half_type(1024, 1024, 16)))
    dist.destroy_process_group()


def test_every_process_of_a_distributed_run_takes_rank_zeros_choice():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    mp.start_processes(_choose_in_process, args=(port, out), nprocs=2, start_method="spawn", join=True)
    assert dict(out.get(timeout=60) for _ in range(2)) == {0: "bf16", 1: "bf16"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/smaps")
def test_the_cast_lets_go_of_each_weights_file_page_it_read(tmp_path):
    """Casting reads every fp32 weight from the file; kept resident until the end, those pages set the peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import load_causal_lm
    from test_mapped_pages import mapped_rss_kb

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path)
    mapped = model.get_input_embeddings().weight.data  # holds the file's mapping open after the cast
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=ALL_PROJECTIONS))
    cast_kb = sum(layer.base_layer.weight.numel() * 4 for _, layer in lora_layers(model)) // 1024

    assert half_base.use_half_base(model, "bf16") == "bf16"

    assert mapped_rss_kb(tmp_path / "model.safetensors") < cast_kb // 10
    assert mapped.dtype == torch.float32


def test_the_loss_multiplies_a_frozen_head_in_the_half_type_while_its_weight_is_unchanged(input_ids):
    from lorakit.train.loss import causal_lm_loss_sum

    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=4, target_modules=ALL_PROJECTIONS))
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids)}
    head = model.get_output_embeddings()
    assert half_base.half_head_weight(head) is head.weight  # nothing kept before the cast
    assert use_fused_paths(model, half_base="bf16")["half_base"] == "bf16"
    kept = half_base.half_head_weight(head)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, head.weight.to(torch.bfloat16))
    assert head.weight.dtype == torch.float32 and model.get_input_embeddings().weight.dtype == torch.float32
    assert "_half_weight" not in str(model.state_dict().keys())

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        hidden = []
        handle = model.model.norm.register_forward_hook(lambda m, i, out: out.retain_grad() or hidden.append(out))
        loss = causal_lm_loss_sum(model, batch)
        loss.backward()
        handle.remove()
        model.zero_grad(set_to_none=True)
        return loss.item(), hidden[0].grad

    half_loss, half_grad = loss_and_grad()
    with torch.no_grad():
        head.weight.mul_(1.0)  # an in-place write: the copy may be stale, so the fp32 weight is used
    assert half_base.half_head_weight(head) is head.weight
    fp32_loss, fp32_grad = loss_and_grad()
    assert half_loss != fp32_loss  # the half copy really ran
    assert abs(half_loss - fp32_loss) <= 1e-2 * abs(fp32_loss)
    assert torch.allclose(half_grad, fp32_grad, rtol=0, atol=2e-2 * fp32_grad.abs().max().item())


def test_head_cross_entropy_with_a_half_weight_equals_float64_products_rounded_as_the_half_type_rounds():
    """Both products take bf16 inputs and answer in bf16 (the logits and dL/dh rounded so); the rest is fp32."""
    from lorakit.train.loss import HeadCrossEntropy

    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(300, 32, generator=generator, requires_grad=True)  # more than one chunk of 256
    weight = torch.randn(97, 32, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 97, (300,), generator=generator)
    loss = HeadCrossEntropy.apply(rows, weight, targets)
    loss.backward()

    def bf16(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).double()

    logits = bf16(bf16(rows.detach()) @ weight.double().T)
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    probs = torch.softmax(logits, dim=-1)
    probs[torch.arange(300), targets] -= 1
    reference_grad = bf16(bf16(probs) @ weight.double())
    assert loss.dtype == torch.float32 and rows.grad.dtype == torch.float32
    assert abs(loss.item() - reference) <= 1e-6 * reference
    assert torch.allclose(rows.grad.double(), reference_grad, rtol=2 ** -7, atol=1e-6)
    exact = (probs @ weight.double()).float()  # unrounded: the test tells the two apart
    assert not torch.allclose(rows.grad, exact, rtol=2 ** -7, atol=1e-6)
