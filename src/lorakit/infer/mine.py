"""Preference pairs from a model's own mistakes: sample replies, score them, keep (prompt, reference, a wrong one).

For every prompt of a training set (instruction records, or every assistant turn of a
conversation with the reference replies as its history) the model samples `samples` replies,
each rendered and decoded exactly as `lorakit generate` does. The task's scorer judges each
against the reference; when one or more are wrong, the pair (prompt, the reference as chosen,
the most frequent wrong reply as rejected) is kept: the mistake the model makes most is the one
worth pushing down. Prompts the model always gets right give no pair.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.config import ConfigError
from lorakit.data.chat import to_messages
from lorakit.data.formats import DataError, validate_records, where
from lorakit.data.templates import ChatTemplate
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.tasks import task_scorer


@dataclass
class MineConfig:
    samples: int = 4  # replies sampled per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32  # sequences per generation batch (prompts x samples)
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.samples < 1:
            out.append(f"--samples: given {self.samples}, expected a positive integer")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            out.append(f"--temperature: given {self.temperature:g}, expected a finite number above 0 (mining samples)")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p: given {self.top_p:g}, expected a number in (0, 1]")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')}: given {getattr(self, name)}, expected a positive integer")
        return out


@dataclass
class Mined:
    pairs: list[dict[str, Any]] = field(default_factory=list)
    prompts: int = 0
    sampled: int = 0
    wrong: int = 0  # wrong samples over all prompts

    def line(self) -> str:
        share = self.wrong / max(self.sampled, 1)
        return (f"{len(self.pairs)} pairs from {self.prompts} prompts: {self.wrong} of {self.sampled} samples "
                f"({share:.1%}) scored wrong; {self.prompts - len(self.pairs)} prompts had none")


def mine_preferences(model: nn.Module, tokenizer, records: list[dict], template, task: str | None,
                     config: MineConfig | None = None) -> Mined:
    """Sample `config.samples` replies per prompt and keep a pair for each prompt with a wrong one.

    Raises:
        ConfigError: the task's scorer cannot say right or wrong per reply, or bad settings.
        DataError: a record that is not an instruction or chat record (named by file:line).
    """
    config = config or MineConfig()
    problems = config.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    scorer = task_scorer(task)
    if getattr(scorer, "multi_reference", False):
        raise ConfigError(f"--task {task}: its scorer rates a set of references, not right or wrong per reply; "
                          "mining needs one that does (ros2, or no --task for exact match)")
    items = prompts_of(records, template, tokenizer)  # (prompt text, prompt as a record field, reference)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, seed=config.seed, batch_size=config.batch_size,
                                  add_special_tokens=not getattr(template, "special_tokens_in_prompt", False))
    k = config.samples
    replies = generate(model, tokenizer, [text for text, _, _ in items for _ in range(k)], generation)
    mined = Mined(prompts=len(items), sampled=len(replies))
    for i, (_, prompt, reference) in enumerate(items):
        wrong = [r for r in replies[i * k : (i + 1) * k] if scorer([r], [reference]).get("exact_match", 0.0) < 1.0]
        mined.wrong += len(wrong)
        if wrong:
            rejected = Counter(wrong).most_common(1)[0][0]  # ties: the first sampled
            mined.pairs.append({"prompt": prompt, "chosen": reference, "rejected": rejected})
    return mined


def prompts_of(records: list[dict], template, tokenizer) -> list[tuple[str, Any, str]]:
    """(the prompt text the model sees, the prompt as the pair records it, the reference) for each prompt.

    Instruction records give one (the pair's prompt is the instruction, which a DPO run renders
    with the same template); conversations give one per assistant turn (the messages before it).
    """
    check_records(records)
    items = []
    for record in records:
        if "messages" in record or "conversations" in record:
            chat = template if isinstance(template, ChatTemplate) else ChatTemplate(tokenizer)
            messages = to_messages(record)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
            for i, (text, reference) in zip(turns, chat.render_turns(record)):
                items.append((text, messages[:i], reference))
        else:
            items.append((template.render(record)[0], record["instruction"], record["output"]))
    return items


def check_records(records: list[dict]) -> None:
    """Every record is an instruction record without an input, or a conversation.

    Raises:
        DataError: the first that is not, named by file:line.
    """
    if any("messages" in record or "conversations" in record for record in records):
        validate_records(records)  # training's own checks: one format, every conversation well formed
        return
    for record in records:
        at = where(record)
        if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
            raise DataError(f"{at}: expected an instruction record (instruction and output strings) or a conversation "
                            "(messages); mining samples replies to the prompts of a training set")
        if isinstance(record.get("input"), str) and record["input"].strip():
            raise DataError(f"{at}: field 'input' is set; a preference pair's prompt is one instruction, so give "
                            "instruction records (or conversations)")


def write_pairs(path: str | Path, pairs: list[dict], force: bool = False) -> Path:
    """Write the pairs as JSONL, whole or not at all; an existing file is replaced only with `force`.

    Raises:
        DataError: `path` exists and `force` is not set.
    """
    path = Path(path)
    if path.exists() and not force:
        raise DataError(f"{path}: already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    os.replace(partial, path)
    return path
