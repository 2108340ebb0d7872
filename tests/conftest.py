"""Tiny models built from a config, one per architecture family lorakit has defaults for."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128

# Property tests (Hypothesis): "ci" (the default) runs a few fixed examples per property so `make test`
# stays quick and repeatable; `pytest --hypothesis-profile thorough` runs many more, freshly drawn.
_SLOW_MACHINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=int(os.environ.get("LORAKIT_PROPERTY_EXAMPLES", "10")), deadline=None,
                          derandomize=True, database=None, suppress_health_check=_SLOW_MACHINE)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_SLOW_MACHINE)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def own_timing_choices(tmp_path_factory, monkeypatch):
    """Each test times lorakit's timed choices afresh (lorakit/machine_choices.py), in a folder of its own: a
    test's patched timing never reaches the machine's remembered answers or another test's."""
    monkeypatch.setenv("LORAKIT_CHOICES", str(tmp_path_factory.mktemp("choices")))


def pytest_terminal_summary(terminalreporter):
    """How many generated inputs each data reader was given (property tests), for the record."""
    formats = sys.modules.get("record_formats")
    if formats is not None and formats.CASES:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(formats.CASES.items()))
        terminalreporter.write_line(f"property cases per reader: {counts}")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_model(mine, theirs, ids: torch.Tensor) -> None:
    """The two models hold the same tensors (state dict and buffers), of the same types, to the bit, say the same
    type in their configs, and compute the same logits for `ids` (in eval mode)."""
    left, right = mine.state_dict(), theirs.state_dict()
    assert left.keys() == right.keys()
    for key, value in right.items():
        assert left[key].dtype == value.dtype and torch.equal(left[key], value), key
    for (name, buffer), (_, other) in zip(theirs.named_buffers(), mine.named_buffers(), strict=True):
        assert other.dtype == buffer.dtype and torch.equal(other, buffer), name
    assert mine.config.dtype == theirs.config.dtype
    assert torch.equal(logits_of(mine.eval(), ids), logits_of(theirs.eval(), ids))


def perturb(model, name: str = "default", std: float = 0.05, seed: int = 0) -> None:
    """Give every LoRA tensor of adapter `name` a random non-zero value, as a few training steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f".adapters.{name}." in param_name or f".copies.{name}." in param_name:
                param.add_(torch.randn(param.shape, generator=generator) * std)


def tiny_tokenizer(sentences: list[str], vocab_size: int = 300):
    """A byte-level BPE trained on `sentences` (any text still encodes, byte by byte); pad is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


CHAT_TEMPLATE = (  # a minimal chat template for toy tokenizers (they ship without one)
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)

TOY_TASK = [  # instruction -> output pairs a tiny model can memorise in a few dozen steps
    {"instruction": f"say {word}", "output": f"{word} {word}"}
    for word in ["red", "green", "blue", "black", "white", "pink", "gold", "grey"]
]


def toy_model_folder(path, seed: int = 0):
    """A tiny Llama and a tokenizer for TOY_TASK, saved as a model folder `lorakit` can load."""
    from lorakit.data.templates import SEED_TEMPLATE

    texts = [SEED_TEMPLATE.format(**r) + r["output"] for r in TOY_TASK]
    tokenizer = tiny_tokenizer(texts)
    torch.manual_seed(seed)
    config = LlamaConfig(  # untied head, wide init: LoRA on a random tiny model needs both to learn fast
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TOY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def bnb_load(folder, bits: int = 4):
    """The same folder loaded the transformers way: BitsAndBytesConfig at load time, fp32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32, device_map="cpu")
    for module in model.modules():  # the repacking for CPU inference that quantize_linear also turns off
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def write_file(folder, name: str, content: str | bytes):
    """Write a data file byte for byte (no newline translation); returns its path."""
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def data_error_of(call, *args, **kwargs) -> str:
    """The message of the DataError that call(*args) raises, checked to be one line."""
    from lorakit.data.formats import DataError

    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error spans lines: {message!r}"
    return message


def on_threads(threads: int, call):
    """call() on `threads` OpenMP threads; the process's count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return call()
    finally:
        torch.set_num_threads(previous)
