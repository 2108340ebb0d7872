"""Batched text generation: left padding, greedy or temperature/top-p sampling, stop at EOS."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor

from lorakit.config import ConfigError
from lorakit.data.masking import prompt_token_ids


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    stop: tuple[str, ...] = ()
    add_special_tokens: bool = True  # False when prompts already hold BOS etc. (chat templates)
    num_beams: int = 1  # > 1: beam search (greedy beams; temperature must be 0)
    length_penalty: float = 1.0  # beam search: score / length**length_penalty; < 1 favours shorter outputs
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size appears twice in the generated text (the prompt aside)

    def __post_init__(self) -> None:
        problems = [f"{name}: given {getattr(self, name)!r}, expected {allowed}" for name, ok, allowed in [
            ("max_new_tokens", self.max_new_tokens >= 1, "a positive integer"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a number >= 0 (0: greedy)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("num_beams", self.num_beams >= 1, "a positive integer"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "an integer >= 0 (0: off)"),
        ] if not ok]
        if problems:
            raise ConfigError.of(problems)


def stop_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have two)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], config: GenerationConfig | None = None) -> list[str]:
    """Complete each prompt; returns only the new text, cut at EOS or the first stop string.

    Greedy by default; temperature > 0 samples; num_beams > 1 runs beam search (the LoRA paper's
    E2E decoding is num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4).

    Prompts are batched `config.batch_size` at a time with left padding, so a batch gives the
    same greedy outputs as one prompt at a time.
    """
    config = config or GenerationConfig()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    stops = stop_token_ids(tokenizer, model)
    # lorakit's settings alone: transformers fills what a call leaves at its default from the model's own
    # generation_config (a repetition_penalty, min_new_tokens, ... there would make temperature 0 other than argmax
    # and differ from lorakit serve), so the model holds a plain one while it generates
    shipped = getattr(model, "generation_config", None)
    model.generation_config = HFGenerationConfig()
    try:
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start : start + config.batch_size]
            enc = _left_padded(prompt_token_ids(tokenizer, chunk, config.add_special_tokens),
                               tokenizer.pad_token_id, device)
            sampling = config.temperature > 0
            beams = {"num_beams": config.num_beams, "length_penalty": config.length_penalty} if config.num_beams > 1 else {}
            if config.no_repeat_ngram_size > 0:
                rule = NewTokensNoRepeatNGram(config.no_repeat_ngram_size, enc["input_ids"].shape[1])
                beams["logits_processor"] = LogitsProcessorList([rule])
            if sampling:
                torch.manual_seed(config.seed + start)
            out = model.generate(
                **enc,
                max_new_tokens=config.max_new_tokens,
                do_sample=sampling,
                temperature=config.temperature if sampling else None,
                top_p=config.top_p if sampling else None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                **beams,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs += [_cut(t, config.stop) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.generation_config = shipped
        model.train(was_training)
    return outputs


def _left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


class NewTokensNoRepeatNGram(LogitsProcessor):
    """transformers' no-repeat-n-gram rule on the generated tokens only.

    transformers' own `no_repeat_ngram_size` also counts the prompt's n-grams, so a data-to-text
    output could not repeat four words of its input ("near the Crowne Plaza Hotel"); the LoRA
    paper's decoder (loralib's gpt2_beam) blocks repeats within the output.
    """

    def __init__(self, ngram_size: int, prompt_length: int):
        self.rule = NoRepeatNGramLogitsProcessor(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.rule(input_ids[:, self.prompt_length :], scores)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest of the stop strings, and whether one was found."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _cut(text: str, stops: tuple[str, ...]) -> str:
    # A stop string (say a line break) before any text does not end the output.
    return cut_at_stop(text.lstrip(), stops)[0].strip()
