"""The children of bench/train_throughput.py, one per variant: each loads the model, trains it --steps steps
from the same initial adapter on the same examples and times them (PEFT + Trainer in run_peft, lorakit in
run_lorakit); prepare writes that initial adapter and counts the useful FLOPs. The variants are described in
train_throughput.py's docstring."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from model_shapes import random_model
from results import RssSampler, peak_rss_mb
from step_profile import step_profile

from lorakit import allocator

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED_MAX_LENGTH = 256
PACK_LENGTH = 256
MEMORY_PACK_LENGTH = 128  # = the examples' max_length: every example still fits a row
LR = 2e-4


def examples(tokenizer, args) -> list[dict]:
    """ROS 2 records tokenised the lorakit way (prompt masked, EOS kept): the common input of all variants."""
    from lorakit.data.masking import tokenize_dataset
    from lorakit.tasks.ros2 import make_split

    out, _ = tokenize_dataset(tokenizer, make_split("train", args.batch * args.steps, seed=0), "seed", 128)
    return out


def load_model(args, qlora: bool = False):
    """--model's weights, or with --model-config that shape's seeded random weights, saved once by the init child as a
    bf16 checkpoint (as the published Qwen2.5 weights are) and loaded as `lorakit train` loads one: in fp32, and a
    QLoRA base in the type it is stored in (run.py's _load_dtype), quantised after."""
    from lorakit.models import load_causal_lm, stored_dtype

    folder = args.model if args.model_config is None else _base_dir(args)
    model = load_causal_lm(folder, stored_dtype(folder) if qlora else torch.float32)
    return model if args.model_config is None else model.train()


def _base_dir(args) -> Path:
    return _work_dir(args) / f"base-{args.model_config}"


def prepare(args) -> dict:
    """Child 'init': write the initial adapter every variant starts from; count the useful FLOPs."""
    from peft import LoraConfig, get_peft_model

    import lorakit
    from lorakit.models import load_tokenizer
    from lorakit.train.flops import StepFlops, gemm_shapes, gemm_work

    tokenizer = load_tokenizer(args.model)
    data = examples(tokenizer, args)
    if args.model_config is not None:  # the shape's random weights, as a bf16 checkpoint every variant loads
        random_model(args.model_config).to(torch.bfloat16).save_pretrained(_base_dir(args))
    model = get_peft_model(load_model(args), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.save_pretrained(_init_dir(args))
    peft_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model  # one model at a time (a 1.5B shape is 6 GB in fp32)
    ours = load_model(args)
    lorakit.load_adapter(ours, _init_dir(args))
    flops = StepFlops.of(ours)
    batches = [data[i * args.batch : (i + 1) * args.batch] for i in range(args.steps)]
    tokens = sum(len(e["input_ids"]) for e in data) // args.steps  # mean real tokens per step
    labelled = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in data) // args.steps
    return {
        "useful_flops_per_step": [flops.examples(batch) for batch in batches],
        "flop_model": vars(flops), "gemm_shapes": gemm_shapes(ours, tokens, labelled),
        "gemm_work": gemm_work(ours, tokens, labelled), "peft_trainable": peft_trainable,
    }


def run_peft(args, recipe: str) -> dict:
    from peft import PeftModel
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class InOrderTrainer(Trainer):  # the examples in the given order, as lorakit's variant takes them
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    from lorakit.data.collate import pad_batch
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    data = examples(tokenizer, args)
    if recipe == "seed":  # the first seed: pad every example to 256, then mask labels by the pad id
        rows = []
        for e in data:
            ids = e["input_ids"] + [tokenizer.pad_token_id] * (SEED_MAX_LENGTH - len(e["input_ids"]))
            labels = [-100 if t == tokenizer.pad_token_id else t for t in ids]
            mask = [int(i < len(e["input_ids"])) for i in range(len(ids))]
            rows.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
        data = rows
    real = []

    def collate(batch):
        out = pad_batch(batch, tokenizer.pad_token_id)
        real.append(int(out["attention_mask"].sum()))
        return out

    model = PeftModel.from_pretrained(load_model(args), _init_dir(args), is_trainable=True)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    training = TrainingArguments(
        output_dir=str(_work_dir(args) / f"peft-{recipe}"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    trainer = InOrderTrainer(model=model, args=training, train_dataset=data, data_collator=collate, callbacks=[Clock()])
    allocator.release_free_memory()  # what loading freed goes back to the OS before the steps, as lorakit's do
    sampler = RssSampler()
    trainer.train()
    rss = sampler.stop()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return _result(stamps, real, args, losses, rss)


def run_lorakit(args, memory_mode: bool = False, qlora: bool = False, half: bool = False) -> dict:
    import lorakit
    from lorakit.config import QuantizationConfig, TrainConfig
    from lorakit.models import load_tokenizer
    from lorakit.quant.model import quantize_model
    from lorakit.train.lean import release_freed_memory, use_fused_paths
    from lorakit.train.loop import accumulate_gradients, real_tokens
    from lorakit.train.objectives import CausalLMObjective
    from lorakit.train.optim import build_optimizer, build_scheduler

    tokenizer = load_tokenizer(args.model)
    data = examples(tokenizer, args)
    model = load_model(args, qlora)
    if qlora:
        quantize_model(model, QuantizationConfig(bits=4, type="nf4", double_quant=True))
    lorakit.load_adapter(model, _init_dir(args))  # the initial adapter every variant starts from
    model.train()
    pack_length = MEMORY_PACK_LENGTH if memory_mode else PACK_LENGTH
    objective = CausalLMObjective(tokenizer.pad_token_id, pack_length=pack_length)
    config = TrainConfig(
        lr=LR, scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0,
        max_tokens_per_forward=pack_length if memory_mode else 0, half_base="auto" if half else "off",
    )
    paths = use_fused_paths(model, config.fused, config.fuse_projections, config.half_base)  # as train() does
    allocator.release_free_memory()  # what loading, quantising and casting freed: back to the OS, as train() does
    if config.release_memory:
        release_freed_memory()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, args.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    stamps, real, losses = [], [], []

    def one_step(step: int) -> None:
        batch = objective.collate(data[step * args.batch : (step + 1) * args.batch])
        real.append(real_tokens(batch))
        losses.append(accumulate_gradients(model, [batch], objective, max_tokens=config.max_tokens_per_forward))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())

    sampler = RssSampler()
    for step in range(args.steps):
        one_step(step)
    rss = sampler.stop()
    result = {**_result(stamps, real, args, losses, rss), "half_base": paths["half_base"]}
    if args.profile:  # after the timing: more steps, over the first batches again, under the profiler
        steps = [args.warmup + i for i in range(min(args.profile, args.steps - args.warmup))]
        result["profile_ms_per_step"] = step_profile(one_step, steps, vocab=model.config.vocab_size)
    return result


def _work_dir(args) -> Path:
    return Path(args.work_dir)


def _init_dir(args) -> str:
    return str(_work_dir(args) / "initial-adapter")


def _result(stamps: list[float], real: list[int], args, losses: list[float], rss: dict) -> dict:
    """Throughput over every step after warm-up (the collate call of step i logs real[i])."""
    if len(stamps) != args.steps:
        raise RuntimeError(f"ran {len(stamps)} steps, expected {args.steps}")
    seconds = stamps[-1] - stamps[args.warmup - 1]
    tokens = sum(real[args.warmup : len(stamps)])
    peak_mb = peak_rss_mb()
    return {
        "real_tokens_per_s": tokens / seconds, "seconds": seconds, "real_tokens": tokens, "peak_rss_mb": peak_mb,
        "allocator": allocator.in_use(), **rss, "steps": len(stamps), "losses": losses,
    }
