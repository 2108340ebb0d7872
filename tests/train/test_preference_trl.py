"""DPO (sigmoid, IPO, RPO) and ORPO against TRL's trainers: same tiny model, pairs, seed and PEFT adapter init.

Each case checks the token ids both sides train on, the gradient of the first batch, the loss of
each of three steps and the adapter after them. The reference log-probabilities of the base with
the adapter switched off are checked against a separately loaded base.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.checkpoint.peft_io import adapter_tensors, load_adapter
from lorakit.config import PreferenceConfig, TrainConfig
from lorakit.data.labels import IGNORE_INDEX
from lorakit.data.preference import collate_pairs, tokenize_preferences
from lorakit.data.templates import SEED_TEMPLATE, get_template
from lorakit.lora.adapters import set_adapter, use_adapter
from lorakit.train.loop import train
from lorakit.train.preference import DPOObjective, ORPOObjective
from lorakit.train.reference import REFERENCE_ADAPTER, Reference

from conftest import tiny_tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

WORDS = ["red", "green", "blue", "gold", "pink", "grey"]
PAIRS = [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"{WORDS[(i + 2) % 6]} {w}"}
         for i, w in enumerate(WORDS[:4])]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adam divides each gradient element by its own magnitude, so an element that is near zero turns fp32
# rounding into a step of up to lr: lr 5e-4 keeps that within TOL (lorakit's rank-wide products sum in another
# order than PEFT's; at 1e-3 one element of 4k differed by 1.03e-5; at 1e-2 one of 18k by 1.8e-5).
LR, STEPS, TOL = 5e-4, 3, 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    texts = [SEED_TEMPLATE.format(instruction=p["prompt"]) + p[k] for p in PAIRS for k in ("chosen", "rejected")]
    tok = tiny_tokenizer(texts)
    tok.backend_tokenizer.post_processor = TemplateProcessing(  # a BOS in front, as Llama's tokenizers do
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def tiny_base(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


def peft_lora():
    """LoRA on every projection with A and B both random (PEFT's init False), so the adapter is no no-op."""
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture(scope="module")
def start(tokenizer, tmp_path_factory):
    """(the base, a trained-looking PEFT adapter folder), for the continued-adapter cases."""
    base = tiny_base(tokenizer)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("peft_start")
    peft.get_peft_model(copy.deepcopy(base), peft_lora()).save_pretrained(folder)
    return base, folder


def peft_model(start):
    base, folder = start
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)


def lorakit_model(start, folder=None, reference: bool = False):
    """The base with the adapter in `folder` (default: the start's) as "default", and its frozen copy if asked."""
    base, start_folder = start
    model = copy.deepcopy(base)
    load_adapter(model, folder or start_folder)
    if reference:
        load_adapter(model, folder or start_folder, REFERENCE_ADAPTER)
        set_adapter(model, "default")
    return model


def peft_named(model) -> dict[str, torch.Tensor]:
    """The PEFT model's LoRA parameters under the names lorakit's adapter_tensors gives."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n and ".ref." not in n}


def records():
    """The pairs as TRL reads them: the prompt rendered with lorakit's seed template."""
    return [{**p, "prompt": SEED_TEMPLATE.format(instruction=p["prompt"])} for p in PAIRS]


class Recorder:
    """Wraps a TRL trainer's compute_loss to keep each step's loss as a float."""

    def __init__(self, trainer):
        self.losses, compute = [], trainer.compute_loss

        def compute_loss(*args, **kwargs):
            loss = compute(*args, **kwargs)
            self.losses.append(float(loss.detach()))
            return loss

        trainer.compute_loss = compute_loss


def trl_common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), max_steps=STEPS,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none", seed=0,
                use_cpu=True, bf16=False, disable_dropout=True, gradient_checkpointing=False, dataloader_drop_last=False)


def make_trl(kind: str, pref: PreferenceConfig, start, tokenizer, tmp_path, continued: bool):
    """(TRL's trainer, the adapter folder it starts from).

    A new adapter: TRL wraps the base with the PEFT config and its reference is the base with the
    adapter off. A continued one: TRL is given the PEFT model and keeps a frozen copy of the adapter
    as the reference ("ref").
    """
    dataset = datasets.Dataset.from_list(records())
    base, folder = start
    model = dict(model=peft_model(start)) if continued else dict(model=copy.deepcopy(base), peft_config=peft_lora())
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(beta=pref.beta, max_length=128, **trl_common(tmp_path))
        trainer = ORPOTrainer(args=args, train_dataset=dataset, processing_class=tokenizer, **model)
    else:
        losses = ["ipo"] if pref.loss_type == "ipo" else ["sigmoid"]
        weights = None
        if pref.rpo_alpha is not None:
            losses, weights = [*losses, "sft"], [1.0, pref.rpo_alpha]
        args = trl.DPOConfig(beta=pref.beta, loss_type=losses, loss_weights=weights, max_length=128,
                             pad_to_multiple_of=None, **trl_common(tmp_path))
        trainer = trl.DPOTrainer(args=args, train_dataset=dataset, processing_class=tokenizer, **model)
    if not continued:  # start lorakit from the adapter TRL just initialised
        folder = tmp_path / "trl_start"
        trainer.model.save_pretrained(folder, selected_adapters=["default"])
    return trainer, folder


def trl_first_batch(kind: str, trainer) -> dict:
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    return trainer.data_collator(rows)


def trl_sequences(kind: str, trainer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each chosen then each rejected sequence, as TRL tokenised them."""
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    if kind == "orpo":
        return [(r[f"{side}_input_ids"], r[f"{side}_labels"]) for side in ("chosen", "rejected") for r in rows]
    out = []
    for side in ("chosen", "rejected"):
        for r in rows:
            ids = r["prompt_ids"] + r[f"{side}_ids"]
            out.append((ids, [IGNORE_INDEX] * len(r["prompt_ids"]) + r[f"{side}_ids"]))
    return out


CASES = {  # (objective, settings, continue a trained adapter with a frozen copy as the reference)
    "dpo-sigmoid": ("dpo", PreferenceConfig(beta=0.1), False),
    "dpo-ipo": ("dpo", PreferenceConfig(beta=0.5, loss_type="ipo"), False),
    "dpo-rpo": ("dpo", PreferenceConfig(beta=0.1, rpo_alpha=0.5), False),
    "dpo-sigmoid-continued": ("dpo", PreferenceConfig(beta=0.1), True),
    "orpo": ("orpo", PreferenceConfig(beta=0.2), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_losses_gradients_and_adapters_equal_trl(case, start, tokenizer, tmp_path):
    kind, pref, continued = CASES[case]
    reference = Reference(REFERENCE_ADAPTER if continued else "base")
    objective = (ORPOObjective if kind == "orpo" else DPOObjective)(tokenizer.pad_token_id, pref, reference)
    examples, _ = tokenize_preferences(tokenizer, PAIRS, get_template("seed"), 128)
    trainer, folder = make_trl(kind, pref, start, tokenizer, tmp_path, continued)
    initial = {k: v.detach().clone() for k, v in peft_named(trainer.model).items() if ".ref." not in k}
    ours = [(e["input_ids"], e["labels"]) for e in examples] + [
        (e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    assert ours == [(list(i), list(labels)) for i, labels in trl_sequences(kind, trainer)]

    # the gradient of the first batch
    model = lorakit_model(start, folder, reference=continued)
    model.train()
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    (objective.loss_sum(model, batch) / objective.count(batch)).backward()
    trainer.model.train()
    trainer.compute_loss(trainer.model, trl_first_batch(kind, trainer)).backward()
    theirs = peft_named(trainer.model)
    for name, param in adapter_tensors(model, "default").items():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=0, atol=TOL, msg=name)
    trainer.model.zero_grad(set_to_none=True)

    # three steps each
    recorder = Recorder(trainer)
    trainer.train()
    model = lorakit_model(start, folder, reference=continued)
    config = TrainConfig(output_dir=str(tmp_path / "ours"), max_steps=STEPS, batch_size=len(PAIRS), lr=LR,
                         scheduler="constant", max_grad_norm=1.0, logging_steps=1, eval_strategy="no",
                         save_strategy="no", progress=False)
    result = train(model, examples, [], config, objective)
    losses = [e["loss"] for e in result.history if e.get("kind") == "train"]
    assert losses == pytest.approx(recorder.losses, abs=TOL)
    assert len(set(round(x, 6) for x in losses)) == STEPS  # the loss moved: the steps did something
    theirs = peft_named(trainer.model)
    moved = 0.0
    for name, param in adapter_tensors(model, "default").items():
        torch.testing.assert_close(param.detach(), theirs[name].detach(), rtol=0, atol=TOL, msg=name)
        moved = max(moved, float((param.detach() - initial[name]).abs().max()))
    assert moved > 100 * TOL


def test_reference_with_the_adapter_off_equals_a_separately_loaded_base(start, tokenizer):
    examples, _ = tokenize_preferences(tokenizer, PAIRS, get_template("seed"), 128)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    model = lorakit_model(start)
    ours = Reference("base").logps(model, batch)
    policy = Reference("policy").logps(model, batch)
    base = tiny_base(tokenizer).eval()
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    picked = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (picked * (batch["labels"][:, 1:] != IGNORE_INDEX)).sum(-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (policy - expected).abs().max() > 1e-3  # the adapter does change them


def test_a_frozen_adapter_copy_is_the_reference_of_a_continued_adapter(start, tokenizer):
    examples, _ = tokenize_preferences(tokenizer, PAIRS, get_template("seed"), 128)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    model = lorakit_model(start, reference=True)
    with torch.no_grad():  # the adapter being trained moves away from its copy
        for tensor in adapter_tensors(model, "default").values():
            tensor.mul_(1.5)
    with use_adapter(model, "reference"):
        assert all(layer.active == ["reference"] for layer in model.modules() if hasattr(layer, "adapters"))
    expected = Reference("policy").logps(lorakit_model(start), batch)
    torch.testing.assert_close(Reference("reference").logps(model, batch), expected, rtol=0, atol=1e-6)
    assert (Reference("policy").logps(model, batch) - expected).abs().max() > 1e-3


def test_precomputed_reference_trains_the_same(start, tokenizer, tmp_path, caplog):
    from lorakit.train.reference import precompute_reference

    runs = []
    for precompute in (False, True):
        examples, _ = tokenize_preferences(tokenizer, PAIRS, get_template("seed"), 128)
        model = lorakit_model(start)
        objective = DPOObjective(tokenizer.pad_token_id, PreferenceConfig(), Reference("base"))
        if precompute:
            cache = tmp_path / "reference_logps.json"
            precompute_reference(model, objective.reference, objective, {"train": examples}, 2, cache, "key")
            objective.reference = Reference("precomputed")
            again = [dict(e, ref_logps=None) for e in examples]
            with caplog.at_level(logging.INFO, logger="lorakit.train.reference"):
                precompute_reference(model, Reference("precomputed"), objective, {"train": again}, 2, cache, "key")
            assert "read from" in caplog.text and [e["ref_logps"] for e in again] == [e["ref_logps"] for e in examples]
        config = TrainConfig(output_dir=str(tmp_path / f"run{precompute}"), max_steps=STEPS, batch_size=2, lr=LR,
                             scheduler="constant", logging_steps=1, eval_strategy="no", save_strategy="no",
                             progress=False)
        result = train(model, examples, [], config, objective)
        runs.append(([e["loss"] for e in result.history if e.get("kind") == "train"],
                     {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=0, atol=1e-6)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_pairs_train_on_the_tokens_and_loss_trl_gives_them(start, tokenizer, tmp_path):
    """Conversational pairs: TRL scores everything the template writes after the prompt (the reply, <|im_end|> and
    the newline after it); lorakit scores the same tokens and gets the same first-batch loss and gradient."""
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat_tokenizer.chat_template = CHATML
    pairs = [{"prompt": [{"role": "user", "content": p["prompt"]}],
              "chosen": [{"role": "assistant", "content": p["chosen"]}],
              "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]
    base = tiny_base(chat_tokenizer)
    base.resize_token_embeddings(len(chat_tokenizer))
    pref = PreferenceConfig(beta=0.1)
    args = trl.DPOConfig(beta=pref.beta, loss_type=["sigmoid"], max_length=128, pad_to_multiple_of=None,
                         **trl_common(tmp_path))
    trainer = trl.DPOTrainer(model=copy.deepcopy(base), peft_config=peft_lora(), args=args,
                             train_dataset=datasets.Dataset.from_list(pairs), processing_class=chat_tokenizer)
    trainer.model.save_pretrained(tmp_path / "trl_start", selected_adapters=["default"])
    examples, _ = tokenize_preferences(chat_tokenizer, pairs, get_template("seed"), 128)
    ours = [(e["input_ids"], e["labels"]) for e in examples] + [
        (e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    assert ours == [(list(i), list(labels)) for i, labels in trl_sequences("dpo", trainer)]
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "trl_start")
    model.train()
    objective = DPOObjective(chat_tokenizer.pad_token_id, pref, Reference("base"))
    batch = collate_pairs(examples, chat_tokenizer.pad_token_id)
    loss = objective.loss_sum(model, batch) / objective.count(batch)
    loss.backward()
    trainer.model.train()
    theirs_loss = trainer.compute_loss(trainer.model, trl_first_batch("dpo", trainer))
    theirs_loss.backward()
    assert float(loss) == pytest.approx(float(theirs_loss), abs=TOL)
    theirs = peft_named(trainer.model)
    for name, param in adapter_tensors(model, "default").items():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=0, atol=TOL, msg=name)
