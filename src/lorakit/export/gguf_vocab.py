"""A transformers tokenizer as GGUF tokenizer keys: llama.cpp's `gpt2` (byte-level BPE) vocabulary.

llama.cpp re-implements each pre-tokenizer (the regex that splits text before BPE) and picks
one by name (`tokenizer.ggml.pre`). lorakit reads the tokenizer's own pre-tokenizer definition
and names the llama.cpp one that splits text the same way; a tokenizer whose pre-tokenizer
matches none of them is refused, since llama.cpp would tokenize it differently.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import gguf

from lorakit.export.errors import ExportError

TokenType = gguf.TokenType

# llama.cpp's pre-tokenizers lorakit can name, keyed by (the Split regex of tokenizer.json, None for
# the GPT-2 regex built into ByteLevel(use_regex=True); digits split one by one first; whether
# decoding removes the space before punctuation, transformers' clean_up_tokenization_spaces).
# llama.cpp names each after a model that introduced it; "trillion" is GPT-2's split without the
# clean-up, "smollm" the same after splitting digits.
GPT2_STYLE = "gpt2-bytelevel"
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple[str, bool, bool], str] = {
    (GPT2_STYLE, False, True): "gpt-2",
    (GPT2_STYLE, False, False): "trillion",
    (GPT2_STYLE, True, False): "smollm",
    (QWEN2_REGEX, False, False): "qwen2",
    (LLAMA3_REGEX, False, False): "llama-bpe",
}


class UnsupportedTokenizerError(ExportError):
    """A tokenizer llama.cpp would not tokenize the same way; the message says what was found."""


@dataclass
class Vocab:
    """What the GGUF file says about the tokenizer."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None  # the list: named templates, "default" first

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        if self.add_eos:  # llama.cpp's default for BPE vocabularies is no EOS
            writer.add_add_eos_token(True)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int, config: Any = None) -> Vocab:
    """Read a fast (tokenizers-backed) byte-level BPE tokenizer into a `Vocab` of `vocab_size` entries.

    A special token the tokenizer does not name (Qwen2's has no BOS) is taken from the model's `config`, as
    llama.cpp's converter takes it; several named chat templates are all written, the default as the chat template.

    Raises:
        UnsupportedTokenizerError: not a fast tokenizer, not byte-level BPE, a pre-tokenizer or
            normalizer llama.cpp has no match for, or more tokens than the model's embedding rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"GGUF export needs a fast (tokenizer.json) tokenizer; {type(tokenizer).__name__} is not one"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedTokenizerError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM); this one is "
            f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    pre = pre_tokenizer_name(spec, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
    if pre == "trillion" and not _joins_digits(tokenizer):
        pre = "smollm"  # splitting digits first changes nothing when no token joins a digit to anything
    tokens, types = _tokens(tokenizer, vocab_size)
    special_ids = {
        kind: token_id
        for kind in ("bos", "eos", "unk", "pad")
        if (token_id := _special_id(tokenizer, config, kind, vocab_size)) is not None
    }
    add_bos, add_eos = added_special_tokens(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": text}
                    for name, text in sorted(template.items(), key=lambda item: item[0] != "default")]
    return Vocab(
        tokens=tokens,
        types=types,
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        pre=pre,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, (str, list)) else None,
    )


def _special_id(tokenizer: Any, config: Any, kind: str, vocab_size: int) -> int | None:
    """The tokenizer's id of a special token, else the model config's (the first of a list); None for one outside
    the vocabulary (a config's -1), which llama.cpp's converter skips too."""
    token_id = getattr(tokenizer, f"{kind}_token_id", None)
    if token_id is None and config is not None:
        token_id = getattr(config, f"{kind}_token_id", None)
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
    usable = isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < vocab_size
    return token_id if usable else None


def pre_tokenizer_name(spec: dict, cleans_spaces: bool = False) -> str:
    """llama.cpp's name for the pre-tokenizer in a tokenizer.json dict, or an error naming what it is."""
    normalizer = spec.get("normalizer")
    steps = _flatten(spec.get("pre_tokenizer"))
    digits = bool(steps) and steps[0].get("type") == "Digits" and steps[0].get("individual_digits", False)
    rest = steps[1:] if digits else steps
    key = None
    if len(rest) == 1 and rest[0].get("type") == "ByteLevel" and rest[0].get("use_regex", True):
        if not rest[0].get("add_prefix_space", False):
            key = (GPT2_STYLE, digits, cleans_spaces)
    elif (
        len(rest) == 2
        and rest[0].get("type") == "Split"
        and rest[0].get("behavior") == "Isolated"
        and not rest[0].get("invert", False)
        and rest[1].get("type") == "ByteLevel"
        and not rest[1].get("use_regex", True)
    ):
        key = ((rest[0].get("pattern") or {}).get("Regex"), digits, False)
    name = PRE_TOKENIZERS.get(key) if key else None
    if name == "qwen2" and normalizer and normalizer.get("type") == "NFC":
        normalizer = None  # Qwen2 normalises to NFC and llama.cpp does not: text already in NFC (nearly all) agrees
    if name is None or normalizer is not None:
        found = "+".join(s.get("type", "?") for s in steps) or "none"
        extra = f" and a {normalizer.get('type')} normalizer" if normalizer else ""
        raise UnsupportedTokenizerError(
            f"llama.cpp has no pre-tokenizer matching this tokenizer's ({found}{extra}); "
            f"GGUF export supports those of {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return name


def _joins_digits(tokenizer: Any) -> bool:
    """Whether any token's text holds a number character (\\p{N}) beside another character; only then
    does splitting digits one by one before BPE change a tokenization."""
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) > 1 and any(unicodedata.category(c).startswith("N") for c in text):
            return True
    return False


def _flatten(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [step for inner in pre.get("pretokenizers", []) for step in _flatten(inner)]
    return [pre]


def _tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UnsupportedTokenizerError(
            f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} embedding rows"
        )
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")  # rows the embedding has and the tokenizer never emits
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[token_id])
        if token_id in added:
            types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return tokens, types


def added_special_tokens(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS in front and EOS at the end, as the tokenizer really does."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos
