"""Published model shapes a bench can build with random weights (no download), to compare cost across sizes.

    model = base_model("smollm2-135m-instruct", shape=None)   # the named model's own weights
    model = base_model("smollm2-135m-instruct", shape="qwen2.5-1.5b")  # that shape, seeded random weights

Each shape is its config.json's fields as published. A shape built twice with the same seed has the same
weights, so separate processes (or separate loads in one) measure the same model. The shapes' vocabularies
all hold SmolLM2's token ids, so a bench keeps tokenising with the named model's tokenizer.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_CONFIGS = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True)),
}  # fmt: skip


def random_model(shape: str, seed: int = 0) -> nn.Module:
    """A causal LM of `shape` (a MODEL_CONFIGS key) with seeded random fp32 weights, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = MODEL_CONFIGS[shape]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **fields, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def base_model(model: str, shape: str | None = None) -> nn.Module:
    """`model`'s own weights (lorakit.models.load_causal_lm), or with `shape` that shape's random weights."""
    if shape is None:
        from lorakit.models import load_causal_lm

        return load_causal_lm(model)
    return random_model(shape)
