"""Conversations on the tokenizer's own chat template: chat.py (and its use by masking, serving, generation)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import data_error_of

from lorakit.data.chat import chat_prompt_messages, prompt_ids, render_prompt, to_messages, tokenize_conversation
from lorakit.data.formats import validate_records
from lorakit.data.labels import IGNORE_INDEX
from lorakit.data.masking import tokenize_dataset

# The models' own templates, verbatim (SmolLM2-135M-Instruct, Qwen2-7B-Instruct, Meta-Llama-3-8B-Instruct).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
FAMILIES = {
    "smollm2": (SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}, "<|im_end|>"),
    "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
}
TEXTS = ["move forward at 0.5 m/s", "ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{linear: {x: 0.5}}'",
         "now the other way", "twice as fast", "stop", "You are a helpful assistant", "system user assistant"]


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's special tokens and its real chat template."""
    template, specials, names, _ = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, family_tokenizer(request.param)


def conversation(turns: int, system: bool = False) -> list[dict]:
    users = ["move forward at 0.5 m/s", "now the other way", "twice as fast", "stop"]
    replies = ["ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{linear: {x: 0.5}}'",
               "ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{linear: {x: -0.5}}'",
               " ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{linear: {x: -1.0}}'",  # a space Llama-3 trims
               "ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{}'"]
    messages = [{"role": "system", "content": "You are a helpful assistant"}] if system else []
    for user, reply in zip(users[:turns], replies[:turns]):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def labelled_runs(example: dict) -> list[list[int]]:
    """The maximal runs of consecutive labelled positions, as label ids."""
    runs, current = [], []
    for label in example["labels"]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("turns", [1, 2, 3, 4])
@pytest.mark.parametrize("system", [False, True])
def test_labels_are_exactly_each_assistant_content_and_its_end_of_turn_token(family, turns, system):
    name, tok = family
    end_of_turn = FAMILIES[name][3]
    messages = conversation(turns, system)
    example = tokenize_conversation(tok, {"messages": messages}, max_length=4096)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [tok(r.strip() if name == "llama3" else r, add_special_tokens=False)["input_ids"]
                + [tok.convert_tokens_to_ids(end_of_turn)] for r in replies]
    assert labelled_runs(example) == expected
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))
    # the ids are the template's whole rendering, nothing added or dropped
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)


def test_last_assistant_labels_only_the_final_turn(family):
    name, tok = family
    messages = conversation(3)
    every = tokenize_conversation(tok, {"messages": messages}, 4096)
    last = tokenize_conversation(tok, {"messages": messages}, 4096, train_on="last_assistant")
    assert last["input_ids"] == every["input_ids"]
    assert labelled_runs(last) == labelled_runs(every)[-1:]


def test_sharegpt_and_messages_give_the_same_ids_and_labels(family):
    _, tok = family
    messages = conversation(4, system=True)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in messages]}
    validate_records([sharegpt], "sharegpt")
    assert to_messages(sharegpt) == messages
    assert tokenize_conversation(tok, sharegpt, 4096) == tokenize_conversation(tok, {"messages": messages}, 4096)
    # LLaMA-Factory's record-level system prompt is the same conversation's first turn
    column = {"system": messages[0]["content"], "conversations": sharegpt["conversations"][1:]}
    validate_records([column], "sharegpt")
    assert to_messages(column) == messages


def test_the_embedded_smollm2_tokenizer():
    from lorakit.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    messages = conversation(3)
    example = tokenize_conversation(tok, {"messages": messages}, 4096)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = [tok(m["content"], add_special_tokens=False)["input_ids"] + [end] for m in messages if m["role"] == "assistant"]
    assert labelled_runs(example) == expected
    assert example["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_training_serving_and_generation_see_the_same_prompt_ids(family):
    """`lorakit serve`'s chat endpoint and `lorakit generate --chat` feed the ids training put before the reply."""
    from lorakit.serve.config import ServeConfig
    from lorakit.serve.inputs import Inputs
    from lorakit.serve.protocol import parse_ask

    _, tok = family
    messages = conversation(3)
    example = tokenize_conversation(tok, {"messages": messages}, 4096, train_on="last_assistant")
    first_label = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    trained_prompt = example["input_ids"][:first_label]

    inputs = Inputs(ServeConfig(), tok, None)
    ask = parse_ask({"model": "m", "messages": messages[:-1]}, True, ServeConfig(), inputs.render_chat)
    assert inputs.tokenize(ask) == [trained_prompt]
    # generate --chat: the record's trailing assistant turn is the reference; the rest is rendered the same way
    generated_prompt = render_prompt(tok, chat_prompt_messages({"messages": messages}))
    assert tok(generated_prompt, add_special_tokens=False)["input_ids"] == trained_prompt
    assert prompt_ids(tok, messages[:-1]) == trained_prompt


def test_masking_sends_chat_and_sharegpt_records_through_the_conversation_path(family):
    _, tok = family
    messages = conversation(2)
    (example,), stats = tokenize_dataset(tok, [{"messages": messages}], "seed", 4096)
    assert example["input_ids"] == tokenize_conversation(tok, {"messages": messages}, 4096)["input_ids"]
    assert stats.response_tokens == sum(len(run) for run in labelled_runs(example))


def test_a_turn_the_template_renders_differently_is_one_error_naming_the_record():
    tok = family_tokenizer("qwen2")
    tok.chat_template = (  # the last message gets a prefix the generation prompt never shows
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}FINAL {% endif %}{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    record = {"messages": conversation(2), "_source": "chat.jsonl", "_line": 4}
    message = data_error_of(tokenize_conversation, tok, record, 256)
    assert message.startswith("chat.jsonl:4: cannot locate assistant turn 1 in the chat template's rendering")


def test_a_conversation_that_masks_to_nothing_is_an_error_not_a_silent_example():
    tok = family_tokenizer("qwen2")
    tok.chat_template = (  # no end-of-turn token: replies close with a plain newline
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok.eos_token = None  # and no EOS to end the last reply with
    record = {"messages": [{"role": "user", "content": "stop"}, {"role": "assistant", "content": ""}],
              "_source": "chat.jsonl", "_line": 7}
    message = data_error_of(tokenize_dataset, tok, [record], "chat", 256)
    assert message.startswith("chat.jsonl:7: no token of the assistant turns carries a label")


@pytest.mark.parametrize("record, field", [
    ({"messages": [{"role": "user", "content": "stop"}, {"role": "assistant", "content": " \n"}]},
     "messages[1].content"),
    ({"conversations": [{"from": "human", "value": "stop"}, {"from": "gpt", "value": ""}]}, "conversations[1].value"),
])
def test_an_empty_last_reply_is_refused_as_an_empty_output_is(record, field):
    message = data_error_of(validate_records, [dict(record, _source="c.jsonl", _line=3)], None)
    assert message == f"c.jsonl:3: field '{field}' is empty (expected the reply to learn)"


def test_null_tool_calls_are_no_call_and_an_empty_system_field_no_system_prompt():
    messages = [{"role": "user", "content": "hi", "tool_calls": None, "function_call": None},
                {"role": "assistant", "content": "hello", "tool_calls": []}]
    assert validate_records([{"messages": messages}], None) == "chat"
    sharegpt = {"system": "", "conversations": [{"from": "system", "value": "be brief"},
                                                {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert validate_records([sharegpt], None) == "sharegpt"
    assert to_messages(sharegpt)[0] == {"role": "system", "content": "be brief"}
    called = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]
    assert "messages[1].tool_calls' is not supported" in data_error_of(validate_records, [{"messages": called}], None)


def test_a_template_without_an_end_of_turn_token_ends_the_last_reply_with_eos():
    tok = family_tokenizer("qwen2")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if not loop.last %}\n{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}\nassistant: {% endif %}")
    example = tokenize_conversation(tok, {"messages": conversation(1)}, 4096)
    assert labelled_runs(example)[-1][-1] == tok.eos_token_id


@pytest.mark.parametrize("closing", ["\n", " [END]\n"])
def test_a_last_reply_closed_by_plain_text_is_ended_by_eos_right_after_it(closing):
    tok = family_tokenizer("qwen2")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}" + closing
                         + "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    example = tokenize_conversation(tok, {"messages": conversation(1)}, 4096)
    last = labelled_runs(example)[-1]
    assert last[-1] == tok.eos_token_id and tok.decode(last[:-1]) == conversation(1)[-1]["content"]
    end = example["input_ids"].index(tok.eos_token_id)
    assert tok.decode(example["input_ids"][end + 1 :]) == closing  # the template's own closing, unlabelled, after it


def test_truncation_keeps_the_start_and_counts_lost_labels(family):
    _, tok = family
    whole = tokenize_conversation(tok, {"messages": conversation(4)}, 4096)
    cut = tokenize_conversation(tok, {"messages": conversation(4)}, len(whole["input_ids"]) - 5)
    assert cut["input_ids"] == whole["input_ids"][:-5] and cut["truncated"] and cut["response_truncated"]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
         "d.jsonl:3: field 'conversations[1].from' is 'bot'"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "d.jsonl:3: the last turn is from 'human'"),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
         "d.jsonl:3: field 'conversations[0].value' is a number 3 (expected a string)"),
        ({"system": ["x"], "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
         "d.jsonl:3: field 'system' is an array"),
        ({"system": "be brief", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                                  {"from": "gpt", "value": "x"}]},
         "d.jsonl:3: field 'system' is given and 'conversations' starts with a system turn too"),
    ],
)
def test_bad_sharegpt_records_are_one_line_naming_the_field(record, expected):
    record.update(_source="d.jsonl", _line=3)
    message = data_error_of(validate_records, [record], "sharegpt")
    assert message.startswith(expected.split(" is ")[0]) and expected.split(" is ")[-1].strip("'") in message
