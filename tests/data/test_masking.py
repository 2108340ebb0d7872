"""Tokenising with the prompt masked by position: masking.py."""

import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorakit.data.collate import pad_batch
from lorakit.data.formats import DataError
from lorakit.data.masking import IGNORE_INDEX, special_prefix_ids, tokenize_dataset, tokenize_example

SENTENCES = [
    "### Instruction:\nlist the ros2 topics\n\n### Command:\nros2 topic list",
    "### Instruction:\nshow the nodes\n\n### Command:\nros2 node list",
    "echo the chatter topic once",
    "<|user|>\nhello there</s>\n<|assistant|>\nhi",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences; pad is EOS, as in the first seed."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


PROMPT = "### Instruction:\nlist the ros2 topics\n\n### Command:\n"
RESPONSE = "ros2 topic list"


def test_prompt_positions_carry_no_label_and_response_labels_equal_input_ids(tok):
    ex = tokenize_example(tok, PROMPT, RESPONSE, max_length=256)
    n_prompt = 1 + len(tok(PROMPT, add_special_tokens=False)["input_ids"])  # BOS + prompt
    n_response = len(tok(RESPONSE, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"]) == n_prompt + n_response
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert IGNORE_INDEX not in ex["labels"][n_prompt:]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert ex["truncated"] is False


def test_eos_is_labelled_even_when_pad_equals_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # the setting that broke the first seed
    ex = tokenize_example(tok, PROMPT, RESPONSE, max_length=256)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][-1] == tok.eos_token_id

    short = tokenize_example(tok, "### Instruction:\nshow the nodes\n\n### Command:\n", "ros2", 256)
    batch = pad_batch([ex, short], pad_token_id=tok.pad_token_id)
    row = batch["labels"][1].tolist()
    n = len(short["input_ids"])
    assert row[n - 1] == tok.eos_token_id  # the real EOS keeps its label...
    assert row[n:] == [IGNORE_INDEX] * (len(row) - n)  # ...the pads (same id) carry none
    assert batch["input_ids"][1, n - 1 :].tolist() == [tok.eos_token_id] * (len(row) - n + 1)


def test_an_eos_inside_the_response_stays_labelled(tok):
    ex = tokenize_example(tok, PROMPT, "ros2</s> again", max_length=256)
    assert ex["labels"].count(tok.eos_token_id) == 2 and ex["labels"][-1] == tok.eos_token_id


def test_a_response_ending_with_the_eos_text_gets_no_second_eos(tok):
    """As TRL's SFT and DPO trainers: data exported from chat-formatted text often carries the end marker."""
    ex = tokenize_example(tok, PROMPT, "ros2</s>", max_length=256)
    assert ex["input_ids"][-2:] != [tok.eos_token_id] * 2 and ex["labels"][-1] == tok.eos_token_id
    assert ex["input_ids"] == tokenize_example(tok, PROMPT, "ros2", max_length=256)["input_ids"]


def test_boundary_is_by_position_even_when_the_response_repeats_the_prompt(tok):
    prompt = "### Instruction:\nros2 topic list\n\n### Command:\n"
    ex = tokenize_example(tok, prompt, "ros2 topic list", max_length=256, add_eos=False)
    response_ids = tok("ros2 topic list", add_special_tokens=False)["input_ids"]
    n_labels = sum(label != IGNORE_INDEX for label in ex["labels"])
    assert n_labels == len(response_ids)
    assert ex["labels"][-n_labels:] == response_ids


def test_bos_is_added_once_at_the_start_of_the_prompt(tok):
    assert special_prefix_ids(tok) == [tok.bos_token_id]
    ex = tokenize_example(tok, PROMPT, RESPONSE, max_length=256)
    assert ex["input_ids"][0] == tok.bos_token_id
    assert ex["input_ids"].count(tok.bos_token_id) == 1


def test_no_bos_when_the_tokenizer_adds_none():
    plain = tiny_tokenizer(add_bos=False)
    assert special_prefix_ids(plain) == []
    ex = tokenize_example(plain, PROMPT, RESPONSE, max_length=256)
    prompt_ids = plain(PROMPT, add_special_tokens=False)["input_ids"]
    response_ids = plain(RESPONSE, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + response_ids + [plain.eos_token_id]


def test_chat_prompt_already_holding_bos_gets_no_second_bos(tok):
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    record = {"messages": messages}
    (ex,), _ = tokenize_dataset(tok, [record], "seed", max_length=256)  # chat records use the chat template
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    labelled = [label for label in ex["labels"] if label != IGNORE_INDEX]
    assert labelled == tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_truncation_cuts_the_prompt_start_and_keeps_the_response(tok):
    full = tokenize_example(tok, PROMPT, RESPONSE, max_length=256)
    n_response = sum(label != IGNORE_INDEX for label in full["labels"])
    ex = tokenize_example(tok, PROMPT, RESPONSE, max_length=n_response + 3)
    assert ex["truncated"] is True and ex["response_truncated"] is False
    assert len(ex["input_ids"]) == n_response + 3
    assert ex["input_ids"][0] == tok.bos_token_id  # BOS survives the cut
    assert ex["input_ids"][1:] == full["input_ids"][-(n_response + 2) :]  # the prompt's end is kept
    assert ex["labels"][-n_response:] == full["labels"][-n_response:]
    assert ex["labels"][:3] == [IGNORE_INDEX] * 3


def test_response_longer_than_max_length_loses_its_end_and_eos(tok):
    long_response = " ".join(["ros2 topic list"] * 20)
    ex = tokenize_example(tok, PROMPT, long_response, max_length=24)
    assert len(ex["input_ids"]) == 24
    assert ex["truncated"] is True and ex["response_truncated"] is True
    assert ex["labels"][-1] != tok.eos_token_id
    n_prompt = ex["labels"].count(IGNORE_INDEX)
    assert 1 < n_prompt <= 12  # BOS + the prompt's last tokens, at most half the window
    response_ids = tok(long_response, add_special_tokens=False)["input_ids"]
    assert ex["labels"][n_prompt:] == response_ids[: 24 - n_prompt]


def test_max_length_must_be_positive(tok):
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        tokenize_example(tok, PROMPT, RESPONSE, max_length=0)


def test_tokenize_dataset_counts_truncated_dropped_and_tokens(tok):
    records = [
        {"instruction": "list the ros2 topics", "output": "ros2 topic list"},
        {"instruction": "show the nodes " * 10, "output": "ros2 node list"},  # prompt too long: truncated
        {"instruction": "say nothing", "output": ""},  # only EOS: kept
    ]
    examples, stats = tokenize_dataset(tok, records, "seed", max_length=24)
    assert stats.examples == len(examples) == 3
    assert stats.truncated == 1 and stats.response_truncated == 0 and stats.dropped == 0
    assert stats.response_tokens == sum(sum(x != IGNORE_INDEX for x in ex["labels"]) for ex in examples)
    assert stats.prompt_tokens == sum(ex["labels"].count(IGNORE_INDEX) for ex in examples)
    assert all(len(ex["input_ids"]) <= 24 for ex in examples)
    assert examples[2]["labels"][-1] == tok.eos_token_id


def test_examples_with_no_label_left_are_dropped_and_counted(tok, caplog):
    records = [
        {"instruction": "list the ros2 topics", "output": "ros2 topic list"},
        {"instruction": "say nothing", "output": "", "_source": "t.jsonl", "_line": 2},
    ]
    with caplog.at_level(logging.WARNING):
        examples, stats = tokenize_dataset(tok, records, "seed", max_length=64, add_eos=False)
    assert (stats.examples, stats.dropped) == (1, 1)
    assert stats.as_dict()["dropped"] == 1
    assert len(examples) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "t.jsonl:2: 1 examples were dropped (this one first): no response token fit in max_length=64"]


def test_all_dropped_is_an_error(tok):
    with pytest.raises(DataError, match=r"<records>: no example has a response token left within max_length 64 \(dropped 1\)"):
        tokenize_dataset(tok, [{"instruction": "a", "output": ""}], "seed", max_length=64, add_eos=False)


def test_render_errors_name_the_record(tok):
    records = [{"instruction": "a", "_source": "d.jsonl", "_line": 5}]
    with pytest.raises(DataError, match=r"^d\.jsonl:5: field 'output' is missing \(expected a string\)$"):
        tokenize_dataset(tok, records, "seed", max_length=64)


def test_a_label_only_at_the_first_position_counts_as_none():
    """The first token is never predicted: an example cut to one token, its response's first (a tokenizer without a
    BOS, a prompt cut away), has nothing to learn; it used to train on nothing and score a perfect loss of 0."""
    from lorakit.models import load_tokenizer

    smollm2 = load_tokenizer("smollm2-135m-instruct")
    assert not special_prefix_ids(smollm2)
    records = [{"instruction": "list the ros2 topics", "output": "ros2 topic list"}]
    example = tokenize_example(smollm2, "list the topics: ", "ros2 topic list", max_length=1)
    assert example["labels"][0] != IGNORE_INDEX and len(example["labels"]) == 1
    with pytest.raises(DataError, match="no example has a response token left within max_length 1"):
        tokenize_dataset(smollm2, records, "seed", max_length=1, add_eos=False)
