"""A base model with a saved adapter, ready to use: for generation, for classification, or merged.

Each loader reads the adapter's run card (`lorakit.json`, written by `lorakit train`) for how it
was trained: its prompt template, the quantisation of its base, its labels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint.peft_io import WEIGHTS_NAME, load_adapter, read_adapter_weights
from lorakit.checkpoint.run_card import read_run_card
from lorakit.config import ConfigError, QuantizationConfig
from lorakit.data.formats import DataError
from lorakit.data.templates import get_template
from lorakit.infer.int8_weights import use_int8_weights
from lorakit.lora.adapters import LORA_DTYPES, round_adapter
from lorakit.models import (
    default_device, load_causal_lm, load_sequence_classifier, load_tokenizer, stored_dtype,
)
from lorakit.quant import quantize_model
from lorakit.quant.merge import GAP_PROMPTS, LogitGap, merge_with_report


def quantize_as_asked(model: nn.Module, bits: int | None, adapter: str | None) -> str | None:
    """Quantise the base to `bits` (4, 8 or None); returns a note when the adapter was trained on another base."""
    card = read_run_card(adapter)  # absent for adapters from elsewhere
    trained = (card.get("quantization") or {}).get("bits")
    note = None
    if card and trained != bits:
        base, flag = (f"{trained}-bit", f"--load-in-{trained}bit") if trained else ("full-precision", "no --load-in flag")
        note = f"the adapter was trained on a {base} base; {flag} reproduces it"
    if bits:  # the 4-bit data type, double quantisation and compute type the adapter was trained with, if it says
        settings = (card.get("quantization") or {}) if trained == bits else {}
        fields = {k: settings[k] for k in ("type", "double_quant", "compute_dtype") if k in settings}
        quantize_model(model, QuantizationConfig(bits=bits, **fields))
    return note


def load_for_inference(
    model_name: str,
    adapter: str | None = None,
    template: str | None = None,
    bits: int | None = None,
    device_map: str | None = None,
    quantize: str = "off",
    lora_dtype: str = "fp32",
):
    """(model, tokenizer, prompt template, note) for a base and optionally an adapter folder.

    The template is `template` if given, else the adapter's (its run card), else the tokenizer's
    chat template, else the bare instruction ('raw'). `note` says when the adapter was trained on a
    base quantised otherwise than `bits` asks (None when not). `quantize` "int8" stores the base's linear
    weights as int8 on the CPU (infer/int8_weights.py), as `lorakit serve --quantize int8` does ("w8a8": their
    inputs rounded to int8 too); `lora_dtype`
    "bf16" rounds the adapter's factors to bf16 values, "int8" each rank of them to int8 values times a power of
    two, as `lorakit serve --lora-dtype` does.

    Raises:
        ConfigError: `quantize` together with `bits`, or int8 weights off the CPU.
    """
    if quantize != "off" and bits:
        raise ConfigError(f"--quantize {quantize} and --load-in-{bits}bit: choose one of the two")
    tokenizer = load_tokenizer(model_name)
    # a base quantised here loads in its stored type, each linear quantised from its fp32 copy (run.py)
    dtype = stored_dtype(model_name) if bits else torch.float32
    model = load_causal_lm(model_name, dtype, device_map=device_map)
    if not device_map:
        model = model.to(default_device())
    note = quantize_as_asked(model, bits, adapter)
    try:
        use_int8_weights(model, quantize)
    except ValueError as err:
        raise ConfigError(f"--quantize: {err}") from None
    if adapter:
        load_adapter(model, adapter)
        if LORA_DTYPES[lora_dtype] is not None:
            round_adapter(model, "default", LORA_DTYPES[lora_dtype])
    spec = template or read_run_card(adapter).get("template") or ("chat" if tokenizer.chat_template else "raw")
    return model, tokenizer, get_template("{instruction}" if spec == "raw" else spec, tokenizer), note


def load_classifier(model_name: str, adapter: str):
    """(model, tokenizer, labels, max_length) from a base and a lorakit/PEFT classification adapter.

    Raises:
        DataError: the adapter holds no classifier head.
    """
    card = read_run_card(adapter)
    heads = [v for k, v in read_adapter_weights(adapter).items() if k.endswith(("classifier.weight", "score.weight"))]
    if not heads:
        raise DataError(f"{Path(adapter) / WEIGHTS_NAME}: holds no classifier head; was it trained with task seq_cls?")
    labels = card.get("labels") or [str(i) for i in range(heads[0].shape[0])]
    model = load_sequence_classifier(model_name, len(labels)).to(default_device())
    quantize_as_asked(model, (card.get("quantization") or {}).get("bits"), adapter)  # the base it was trained on
    load_adapter(model, adapter)
    return model, load_tokenizer(model_name), labels, card.get("max_length", 128)


def load_merged(
    model_name: str, adapter: str, bits: int | None = None, base_full_precision: bool = False
) -> tuple[nn.Module, object, list[LogitGap], str | None]:
    """(the plain merged model, its tokenizer, logit gaps, note): the adapter folded into its base.

    With `bits` the adapter is applied to the quantised base it was trained on, the base
    dequantised and the adapter merged in fp32, and the gaps to the adapter on the quantised base
    are measured; `base_full_precision` merges into the original full-precision base instead (and
    reports that gap too). Without `bits` there are no gaps.
    """
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name)
    note = quantize_as_asked(model, bits, adapter)
    load_adapter(model, adapter)
    tied = model.config.get_text_config().tie_word_embeddings
    if not bits:
        from lorakit.lora.merge import merge_and_unload

        merged, gaps = merge_and_unload(model), []
    else:
        def full_precision():
            base = load_causal_lm(model_name)
            load_adapter(base, adapter)
            return base

        batches = [dict(tokenizer(p, return_tensors="pt", return_token_type_ids=False)) for p in GAP_PROMPTS]
        merged, gaps = merge_with_report(model, batches, full_precision if base_full_precision else None)
    if tied and not merged.config.get_text_config().tie_word_embeddings:
        untied = ("the adapter changes a weight the base ties between its embeddings and its head; the merged model "
                  "keeps them apart (tie_word_embeddings false), so it answers as the adapter does")
        note = f"{note}; {untied}" if note else untied
    return merged, tokenizer, gaps, note
