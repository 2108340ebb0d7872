"""Prompt templates and the chat-template split: templates.py."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import data_error_of

from lorakit.data.templates import (
    ALPACA_NO_INPUT_TEMPLATE,
    ALPACA_TEMPLATE,
    SEED_TEMPLATE,
    ChatTemplate,
    PromptTemplate,
    get_template,
)

# A Zephyr-like template: a BOS first, each turn closed by </s>, and a generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


SUM_RECORD = {"instruction": "Sum", "input": "2 and 3", "output": "5"}


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory; rendering needs no vocabulary beyond the specials."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "hello": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# --------------------------------------------------------------------------- format-string templates


def test_seed_template_renders_exactly():
    record = {"instruction": "list the topics", "output": "ros2 topic list"}
    prompt, response = get_template("seed").render(record)
    assert prompt == "### Instruction:\nlist the topics\n\n### Command:\n"
    assert response == "ros2 topic list"
    assert SEED_TEMPLATE == "### Instruction:\n{instruction}\n\n### Command:\n"


def test_ros2_is_an_alias_of_seed():
    assert get_template("ros2") is get_template("seed")


def test_alpaca_with_input():
    prompt, response = get_template("alpaca").render(SUM_RECORD)
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert prompt == ALPACA_TEMPLATE.format(instruction="Sum", input="2 and 3")
    assert response == "5"


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}, {"input": "  "}])
def test_alpaca_without_input_uses_the_no_input_prompt(extra):
    prompt, _ = get_template("alpaca").render({"instruction": "Say hi", "output": "hi", **extra})
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi\n\n### Response:\n"
    )
    assert prompt == ALPACA_NO_INPUT_TEMPLATE.format(instruction="Say hi")


def test_seed_refuses_to_drop_a_set_input():
    record = {"instruction": "a", "input": "context", "output": "b", "_source": "d.jsonl", "_line": 7}
    message = data_error_of(get_template("seed").render, record)
    assert message.startswith("d.jsonl:7: field 'input' is set but template 'seed' has no {input}")


def test_missing_field_names_file_and_line():
    message = data_error_of(get_template("seed").render, {"instruction": "a", "_source": "d.jsonl", "_line": 3})
    assert message == "d.jsonl:3: field 'output' is missing (expected a string)"


def test_custom_format_string():
    template = get_template("Q: {instruction}\nContext: {input}\nA: ")
    assert template.render({"instruction": "why", "input": "sky", "output": "blue"}) == (
        "Q: why\nContext: sky\nA: ",
        "blue",
    )
    assert template.render({"instruction": "why", "output": "blue"})[0] == "Q: why\nContext: \nA: "


def test_custom_with_literal_braces():
    template = PromptTemplate("json", 'Return {{"cmd": ...}} for: {instruction}\n')
    assert template.render({"instruction": "x", "output": "y"})[0] == 'Return {"cmd": ...} for: x\n'


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("Q: {question}\nA: ", "template 'custom' has unknown placeholder {question}; allowed: {instr"),
        ("{instruction} {output}", "template 'custom' uses {output}; the response follows the prompt"),
        ("Input: {input}\n", "template 'custom' has no {instruction} placeholder"),
        ("{instruction", "template 'custom' is not a valid format string"),
        ("{instruction} {}", "template 'custom' has unknown placeholder {}"),
        ("llama3", "unknown template 'llama3'; expected one of seed, ros2, alpaca, chat or a format string"),
    ],
)
def test_bad_template_specs(spec, expected):
    assert data_error_of(get_template, spec).startswith(expected)


def test_chat_needs_a_turn_before_the_reply():
    record = {"messages": [{"role": "assistant", "content": "x"}], "_source": "c.jsonl", "_line": 2}
    assert data_error_of(ChatTemplate(tiny_tokenizer()).render, record) == (
        "c.jsonl:2: expected at least one message (system or user) before the assistant's"
    )


def test_prompt_template_rejects_chat_records():
    record = {"messages": [{"role": "assistant", "content": "x"}], "_source": "c.jsonl", "_line": 1}
    assert data_error_of(get_template("alpaca").render, record) == (
        "c.jsonl:1: a chat record cannot use template 'alpaca'; use template 'chat'"
    )


# --------------------------------------------------------------------------- chat templates


def test_chat_split_is_generation_prompt_then_last_assistant_content():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "list topics"},
        {"role": "assistant", "content": "ros2 topic list"},
    ]
    prompt, response = get_template("chat", tok).render({"messages": messages})
    assert prompt == (
        "<s><|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\nhello</s>\n"
        "<|user|>\nlist topics</s>\n<|assistant|>\n"
    )
    assert response == "ros2 topic list"
    # the prompt is exactly the full conversation's rendering up to the last reply
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt) :].startswith(response)


def test_instruction_record_through_chat_template():
    prompt, response = ChatTemplate(tiny_tokenizer()).render(SUM_RECORD)
    assert prompt == "<s><|user|>\nSum\n\n2 and 3</s>\n<|assistant|>\n"
    assert response == "5"


def test_chat_needs_a_chat_template():
    message = data_error_of(get_template, "chat", tiny_tokenizer(chat_template=None))
    assert message.startswith("template 'chat' needs a tokenizer with a chat_template")
    assert data_error_of(get_template, "chat").startswith("template 'chat' needs the tokenizer")


def test_chat_template_errors_name_the_record():
    tok = tiny_tokenizer("{{ raise_exception('roles must alternate') }}")
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    record.update(_source="c.jsonl", _line=9)
    message = data_error_of(ChatTemplate(tok).render, record)
    assert message.startswith("c.jsonl:9: the tokenizer's chat template rejected the conversation")
    assert "roles must alternate" in message
