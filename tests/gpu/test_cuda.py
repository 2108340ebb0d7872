"""The GPU paths: the CPU tests' checks, run on a CUDA device (the module skips where there is none)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.config import QuantizationConfig, TrainConfig
from lorakit.data.collate import pad_batch
from lorakit.data.masking import tokenize_dataset
from lorakit.data.packing import pack_batch
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.infer.multi_adapter import Request, generate_mixed
from lorakit.lora.layer import LoraLayer
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.train.loop import train
from lorakit.train.loss import causal_lm_loss_sum, label_token_count
from lorakit.train.objectives import CausalLMObjective
from conftest import TINY_MODELS, TOY_TARGETS, TOY_TASK, perturb, toy_model_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _fp32_matmuls():
    """Exact fp32 products (no TF32), so the 1e-5 tolerances of the CPU tests hold."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_fused_lora_gradients_match_plain_autograd_on_cuda():
    _fp32_matmuls()
    layer = LoraLayer(nn.Linear(64, 48))
    layer.add_adapter("a", r=4, alpha=8, init=False)
    layer.to(CUDA)
    assert layer.can_fuse()
    x = torch.randn(3, 5, 64, device=CUDA)
    weight = torch.linspace(-1, 1, 48, device=CUDA)
    results = []
    for fused in (False, True):
        layer.fused = fused
        xi = x.clone().requires_grad_(True)
        (layer(xi) * weight).sum().backward()
        adapter = layer.adapters["a"]
        results.append((xi.grad, adapter.A.grad.clone(), adapter.B.grad.clone()))
        adapter.A.grad = adapter.B.grad = None
    for plain, fused in zip(*results):
        assert (plain - fused).abs().max().item() <= 1e-5


def test_packed_loss_and_gradients_equal_the_padded_ones_on_cuda():
    _fp32_matmuls()
    model = lorakit.inject(TINY_MODELS["llama"](), lorakit.LoraConfig(r=2, init_lora_weights=False)).to(CUDA)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 12, 7, 4, 8):
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    padded = {k: v.to(CUDA) for k, v in pad_batch(examples, 0).items()}
    packed = {k: v.to(CUDA) for k, v in pack_batch(examples, 32, 0).items()}
    assert packed["input_ids"].shape[0] < len(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_padded = causal_lm_loss_sum(model, padded)
    grads_padded = torch.autograd.grad(loss_padded, params)
    loss_packed = causal_lm_loss_sum(model, packed)
    grads_packed = torch.autograd.grad(loss_packed, params)
    tokens = label_token_count(padded["labels"])
    assert abs(loss_packed.item() - loss_padded.item()) / tokens <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_padded, grads_packed)) <= 1e-5


def test_mixed_adapter_batch_on_cuda_equals_each_request_with_its_adapter_merged(tmp_path):
    _fp32_matmuls()
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    names = ["a", "b", "c"]
    for seed, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + 2 * seed, lora_alpha=8, target_modules=TOY_TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
        lorakit.save_adapter(model, tmp_path / name, name)
    model.to(CUDA)
    plan = [("a", "say red"), ("b", "say green and"), (None, "gold"), ("c", "white grey"), ("a", "say pink pink")]
    requests = [Request(tokenizer(p)["input_ids"], a, max_tokens=8) for a, p in plan]
    mixed = generate_mixed(model, tokenizer, requests)
    config = GenerationConfig(max_new_tokens=8, add_special_tokens=False)
    for (adapter, prompt), completion in zip(plan, mixed):
        alone = load_causal_lm(folder)
        if adapter is not None:
            lorakit.load_adapter(alone, tmp_path / adapter)
            lorakit.merge_and_unload(alone)
        assert completion.text == generate(alone.to(CUDA), tokenizer, [prompt], config)[0], (adapter, prompt)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_learns_the_toy_task(tmp_path, precision):
    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    examples, _ = tokenize_dataset(tokenizer, TOY_TASK, "seed", max_length=64)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=TOY_TARGETS))
    model.to(CUDA)
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), max_steps=120, batch_size=4, lr=1e-2, warmup_ratio=0.05,
        eval_strategy="no", save_strategy="no", progress=False, logging_steps=20, precision=precision,
    )
    result = train(model, examples, examples, config, CausalLMObjective(tokenizer.pad_token_id))
    losses = [e["loss"] for e in result.history if e["kind"] == "train"]
    assert losses[-1] < 0.1 * losses[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainable)  # master weights stay fp32
    prompts = [f"### Instruction:\n{r['instruction']}\n\n### Command:\n" for r in TOY_TASK]
    outputs = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=20))
    assert sum(o == r["output"] for o, r in zip(outputs, TOY_TASK)) >= len(TOY_TASK) - 1


def _bnb_on_cuda():
    try:
        import bitsandbytes as bnb

        bnb.functional.quantize_4bit(torch.ones(64, device=CUDA))
    except Exception as error:  # not installed, or built without this CUDA
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


@pytest.mark.skipif(torch.cuda.is_available() and _bnb_on_cuda() is not None, reason="bitsandbytes has no CUDA here")
@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_8bit"])
def test_qlora_on_a_4bit_cuda_base_learns_the_toy_task_and_merges(tmp_path, optimizer):
    from lorakit.quant import is_quantized, quantize_model

    folder = toy_model_folder(tmp_path / "model")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder).to(CUDA)
    quantize_model(model, QuantizationConfig(bits=4))
    quantised = [m for m in model.modules() if is_quantized(m)]
    assert len(quantised) == 14 and all(m.weight.device.type == "cuda" for m in quantised)
    assert all(type(m.weight).__name__ == "Params4bit" and m.weight.quant_state is not None for m in quantised)
    examples, _ = tokenize_dataset(tokenizer, TOY_TASK, "seed", max_length=64)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=TOY_TARGETS))
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), max_steps=120, batch_size=4, lr=1e-2, warmup_ratio=0.05,
        eval_strategy="no", save_strategy="no", progress=False, logging_steps=20, precision="bf16",
        optimizer=optimizer,
    )
    result = train(model, examples, examples, config, CausalLMObjective(tokenizer.pad_token_id))
    losses = [e["loss"] for e in result.history if e["kind"] == "train"]
    assert losses[-1] < 0.2 * losses[0]

    ids = tokenizer([f"### Instruction:\n{r['instruction']}\n\n### Command:\n" for r in TOY_TASK[:4]],
                    return_tensors="pt", padding=True).to(CUDA)
    with torch.no_grad():
        on_4bit = model(**ids).logits.float()
        lorakit.merge_and_unload(model)  # dequantises the base, then folds the adapter in
        assert not any(is_quantized(m) for m in model.modules())
        merged = model(**ids).logits.float()
    mask = ids["attention_mask"].bool()
    assert (on_4bit.argmax(-1)[mask] == merged.argmax(-1)[mask]).float().mean() >= 0.9
    assert (on_4bit - merged).abs().max() <= 0.05 * on_4bit.abs().max()
