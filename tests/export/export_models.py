"""Tiny models of each exportable architecture, saved as folders with a trained tokenizer of the matching style."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lorakit.export.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX

TEXTS = [
    "Move forward at 0.5 m/s for 3 seconds.",
    "ros2 topic pub /cmd_vel geometry_msgs/msg/Twist \"{linear: {x: 0.5}}\"",
    "The Eagle is a coffee shop near Burger King; it's cheap and family-friendly.",
    "def add(a, b):\n    return a + b  # 1234 + 56.78",
    "Zürich café — naïve résumé 東京 🚀 123456789",
    "I've been told he'll say 'we're there', didn't he?   \t\n\n  spaces",
]


def styled_tokenizer(style: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TEXTS with the pre-tokenizer of `style` (gpt2, smollm, qwen2, llama3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "smollm"))
    steps = {
        "gpt2": [byte_level],
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "qwen2": [pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"), byte_level],
        "llama3": [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), byte_level],
    }[style]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token=None,
        clean_up_tokenization_spaces=style == "gpt2",  # as GPT-2's own tokenizer does
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def tiny_model(arch: str, vocab_size: int, tie: bool = True):
    """A random tiny causal LM of `arch`; widths are multiples of 32 so q8_0 blocks fit."""
    torch.manual_seed(0)
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
                             initializer_range=0.1, **common)
        return LlamaForCausalLM(config).eval()
    if arch == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
                             initializer_range=0.1, **common)
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():  # random, non-zero q/k/v biases, so the export of biases is checked
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
        return model
    # n_positions stays 1024: transformers' GGUF loader reads gpt2.context_length into n_ctx, not n_positions
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, initializer_range=0.1, **common)
    return GPT2LMHeadModel(config).eval()


STYLE_OF = {"llama": "smollm", "qwen2": "qwen2", "gpt2": "gpt2"}


def tiny_folder(path, arch: str, style: str | None = None, tie: bool = True):
    """Save a tiny `arch` model with a tokenizer of `style` (default: the architecture's usual one)."""
    tokenizer = styled_tokenizer(style or STYLE_OF[arch])
    model = tiny_model(arch, len(tokenizer), tie)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

ARCHS = ["llama", "qwen2", "gpt2"]
