"""The useful-FLOP count against what torch's FLOP counter sees in a plain LoRA step on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorakit
from conftest import tiny_llama
from lorakit.lora.layer import LoraLayer
from lorakit.train.flops import StepFlops, gemm_shapes, gemm_work

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N = 10  # tokens of the one sequence


@pytest.fixture
def model():
    model = tiny_llama()
    model.config._attn_implementation = "eager"  # attention as two counted batched matmuls
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for module in model.modules():  # the plain path: every product a separate, counted GEMM
        if isinstance(module, LoraLayer):
            module.fused = False
    return model.train()


def _counted(model, backward: bool) -> dict[str, int]:
    ids = torch.randint(3, 128, (1, N), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        if backward:
            logits.sum().backward()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def test_parameters_are_counted_by_kind(model):
    flops = StepFlops.of(model)
    per_layer_base = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64  # q, o; k, v (2 kv heads of 8); gate, up, down
    per_layer_lora = 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # r x (in + out) for each of the seven
    assert flops == StepFlops(2 * per_layer_base, 2 * per_layer_lora, layers=2, attention_width=32, head_params=128 * 32)


def test_forward_matches_torchs_count(model):
    flops, counted = StepFlops.of(model), _counted(model, backward=False)
    assert counted["aten.mm"] == 2 * (flops.frozen_matmul_params + flops.trained_matmul_params) * N + 2 * flops.head_params * N
    assert counted["aten.bmm"] == 4 * flops.layers * flops.attention_width * N * N  # eager: every pair, causal or not


def test_backward_is_input_gradients_for_frozen_weights_and_weight_gradients_for_lora(model):
    flops, counted = StepFlops.of(model), _counted(model, backward=True)
    # The count includes the first layer's q/k/v input gradients into the frozen embedding; autograd skips them.
    first_qkv = 2 * N * ((32 * 32 + 2 * 32 * 16) + 3 * 4 * 32)  # base weights and LoRA's A
    head_everywhere = 4 * flops.head_params * N  # the model computes logits at every position
    matmuls = (4 * flops.frozen_matmul_params + 6 * flops.trained_matmul_params) * N + head_everywhere
    assert counted["aten.mm"] == matmuls - first_qkv
    assert counted["aten.bmm"] == 3 * 4 * flops.layers * flops.attention_width * N * N  # backward: twice forward


def test_example_counts_causal_pairs_and_labelled_positions_only():
    flops = StepFlops(frozen_matmul_params=100, trained_matmul_params=10, layers=2, attention_width=8, head_params=50)
    assert flops.example(4, 1) == (400 + 60) * 4 + 12 * 2 * 8 * 10 + 4 * 50 * 1
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    assert flops.examples(examples) == flops.example(4, 2) + flops.example(2, 1)  # the first label predicts nothing


def test_gemm_shapes_cover_forward_and_input_gradient(model):
    shapes = gemm_shapes(model, tokens=100, labelled=20)
    assert (100, 32, 64) in shapes and (100, 64, 32) in shapes  # gate/up forward, their input gradient
    assert (100, 32, 16) in shapes and (20, 32, 128) in shapes and (20, 128, 32) in shapes
    assert (100, 32, 128) in shapes and (100, 64, 32) in shapes  # gate/up packed; q/k/v packed: 32 + 16 + 16
    assert len(shapes) == len(set(shapes))


def test_gemm_work_is_the_frozen_and_head_products_of_the_useful_count(model):
    """Packed siblings at their summed width, each frozen weight once forward and once for the input
    gradient, the head at the labelled rows: as many FLOPs as the useful count gives those weights."""
    flops = StepFlops.of(model)
    work = gemm_work(model, tokens=100, labelled=20)
    total = sum(2 * m * k * n * count for m, k, n, count in work)
    assert total == 4 * flops.frozen_matmul_params * 100 + 4 * flops.head_params * 20
    widths = {n for m, k, n, _ in work if m == 100}
    q, k, v = (getattr(model.model.layers[0].self_attn, name).base_layer for name in ("q_proj", "k_proj", "v_proj"))
    assert q.out_features + k.out_features + v.out_features in widths
