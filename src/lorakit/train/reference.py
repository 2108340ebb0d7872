"""The reference model of preference tuning, without a second model in memory.

DPO scores the policy against a fixed reference: the model as it was when preference training
began. That is the base with the adapter switched off when a new adapter is trained, or a frozen
copy of the starting adapter (a few MB beside the one being trained) when a trained adapter is
continued (`train.init_adapter`, e.g. SFT then DPO). With `train.precompute_reference` the
reference's log-probabilities are computed once before the first step, kept in the examples, and
written beside the run (`reference_logps.json`, keyed by a fingerprint of the base, the starting
adapter and the token ids), so a resumed run reads them back instead of computing them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.data.labels import IGNORE_INDEX
from lorakit.lora.adapters import disable_adapters, use_adapter
from lorakit.train.logprobs import token_logps

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"
CACHE_NAME = "reference_logps.json"


class Reference:
    """How to run the reference: `"base"` (adapters off), an adapter's name, `"policy"` (the model as it
    is: right only before the first step, to precompute from a continued adapter), or `"precomputed"`
    (every batch carries `ref_logps`; running the reference is an error).
    """

    def __init__(self, mode: str = "base"):
        self.mode = mode

    def context(self, model: nn.Module):
        if self.mode == "precomputed":
            raise RuntimeError("the reference log-probabilities were precomputed, yet a batch came without them")
        if self.mode == "base":
            return disable_adapters(model)
        if self.mode == "policy":
            return contextlib.nullcontext()
        return use_adapter(model, self.mode)

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows,) summed log-probabilities of each row's labelled tokens under the reference."""
        done = batch["labels"][:, 1:] != IGNORE_INDEX
        with self.context(model):
            return token_logps(model, batch, done).sum(-1)


@torch.no_grad()
def precompute_reference(model: nn.Module, reference: Reference, objective, splits: dict[str, list[dict]],
                         batch_size: int, cache: Path | None = None, fingerprint: str = "", write: bool = True) -> None:
    """Put `ref_logps` = (chosen, rejected) into every example of every split, from `cache` when it matches.

    The model runs in eval mode; `cache` (if given) is written atomically afterwards when `write`
    (rank 0 of a data-parallel run: every process computes, one writes).
    """
    saved = _read_cache(cache, fingerprint)
    if saved is not None and all(len(saved.get(name, ())) == len(ex) for name, ex in splits.items()):
        for name, examples in splits.items():
            for example, pair in zip(examples, saved[name]):
                example["ref_logps"] = tuple(pair)
        log.info("reference log-probabilities read from %s", cache)
        return
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for name, examples in splits.items():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in objective.collate(chunk).items()}
            chosen, rejected = reference.logps(model, batch).chunk(2)
            for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                example["ref_logps"] = (c, r)
        out[name] = [list(e["ref_logps"]) for e in examples]
    model.train(was_training)
    log.info("reference log-probabilities computed for %s", ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    if cache is not None and write:
        _write_cache(cache, {"fingerprint": fingerprint, **out})


def fingerprint(*parts: object, examples: dict[str, list[dict]] | None = None) -> str:
    """A hash of `parts` (names, files' bytes for paths that exist) and the examples' token ids."""
    digest = hashlib.sha256()
    for part in parts:
        path = Path(str(part)) if part is not None else None
        if path is not None and path.is_file():
            digest.update(path.read_bytes())
        else:
            digest.update(repr(part).encode())
    for name, split in (examples or {}).items():
        digest.update(name.encode())
        for e in split:
            digest.update(repr((e["input_ids"], e["labels"], e["rejected_input_ids"], e["rejected_labels"])).encode())
    return digest.hexdigest()


def _read_cache(path: Path | None, expected: str) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s: unreadable; computing the reference log-probabilities again", path)
        return None
    return saved if isinstance(saved, dict) and saved.get("fingerprint") == expected else None


def _write_cache(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content), encoding="utf-8")
    os.replace(partial, path)
