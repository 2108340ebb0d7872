"""Preference pairs: checked with one line per problem, tokenised as supervised examples and conversations are."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TOY_TASK, tiny_tokenizer
from lorakit.data.files import load_records
from lorakit.data.formats import DataError, validate_records
from lorakit.data.labels import IGNORE_INDEX
from lorakit.data.masking import tokenize_example
from lorakit.data.preference import collate_pairs, scoring_record, tokenize_preferences
from lorakit.data.templates import SEED_TEMPLATE, get_template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer([SEED_TEMPLATE.format(**r) + r["output"] for r in TOY_TASK])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def write(tmp_path, rows) -> str:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "say red", "chosen": "red red"}, "prefs.jsonl:2: field 'rejected' is missing (expected a string)"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prefs.jsonl:2: field 'prompt' is a string '' (expected a "
                                                     "non-empty string or a list of messages)"),
    ({"prompt": "say red", "chosen": 3, "rejected": "b"}, "prefs.jsonl:2: field 'chosen' is a number 3"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "prefs.jsonl:2: field 'chosen' is an array"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "prefs.jsonl:2: field 'prompt' ends with an assistant message"),
    ({"prompt": "say red", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "b"},
     "prefs.jsonl:2: field 'chosen' is a message list but 'prompt' is a string"),
    ({"prompt": [{"role": "user", "content": "hi", "tool_calls": [{"x": 1}]}], "chosen": "a", "rejected": "b"},
     "prefs.jsonl:2: field 'prompt[0].tool_calls' is not supported"),
])
def test_a_bad_pair_is_one_line_naming_the_line_and_field(tmp_path, record, message):
    good = {"prompt": "say red", "chosen": "red red", "rejected": "blue blue"}
    path = write(tmp_path, [good, {**good, **record} if "rejected" in record else record])
    with pytest.raises(DataError) as err:
        validate_records(load_records(path), "preference", path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plain_pairs_are_the_supervised_example_of_each_reply(tokenizer):
    pair = {"prompt": "say red", "chosen": "red red", "rejected": "blue red"}
    (example,), stats = tokenize_preferences(tokenizer, [pair], get_template("seed"), 64)
    prompt = SEED_TEMPLATE.format(instruction="say red")
    for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
        expected = tokenize_example(tokenizer, prompt, pair[side], 64)
        assert example[f"{prefix}input_ids"] == expected["input_ids"]
        assert example[f"{prefix}labels"] == expected["labels"]
        assert example[f"{prefix}labels"][-1] == tokenizer.eos_token_id  # the EOS is scored
    assert stats.pairs == 1 and stats.dropped == 0


def test_chat_pairs_label_what_the_template_writes_after_the_prompt_as_trl_does(tokenizer):
    prompt = [{"role": "system", "content": "be short"}, {"role": "user", "content": "say red"},
              {"role": "assistant", "content": "red red"}, {"role": "user", "content": "now blue"}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "blue blue"}], "rejected": "red red"}
    (example,), _ = tokenize_preferences(tokenizer, [pair], get_template("seed"), 128)
    asked = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    for prefix, reply in (("", "blue blue"), ("rejected_", "red red")):
        whole = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=False)
        assert example[f"{prefix}input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]
        labels = example[f"{prefix}labels"]
        assert labels[: len(asked)] == [IGNORE_INDEX] * len(asked)
        assert tokenizer.decode(labels[len(asked):]) == f"{reply}<|im_end|>\n"  # the newline after it too
    assert scoring_record(pair)["messages"][-1] == {"role": "assistant", "content": "blue blue"}


def test_a_chat_pair_needs_a_chat_template_and_is_cut_as_a_plain_pair(tokenizer):
    plain = tiny_tokenizer(["say red"])
    pair = {"prompt": [{"role": "user", "content": "say red"}], "chosen": "red", "rejected": "blue"}
    with pytest.raises(DataError, match="a chat pair is rendered with the tokenizer's chat template, and this "
                                        "tokenizer has none"):
        tokenize_preferences(plain, [{**pair, "_source": "p.jsonl", "_line": 3}], get_template("seed"), 64)
    long = {**pair, "prompt": [{"role": "user", "content": " ".join(["say red"] * 30)}]}
    (example,), stats = tokenize_preferences(tokenizer, [long], get_template("seed"), 24)
    assert stats.truncated == 1 and len(example["input_ids"]) <= 24  # the prompt's start cut, not the pair dropped
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "red<|im_end|>\n"


def test_a_pair_batch_is_the_chosen_rows_then_the_rejected_rows(tokenizer):
    pairs = [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": "grey"} for w in ("red", "gold")]
    examples, _ = tokenize_preferences(tokenizer, pairs, get_template("seed"), 64)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and "ref_logps" not in batch
    assert batch["input_ids"][1, : len(examples[1]["input_ids"])].tolist() == examples[1]["input_ids"]
    assert batch["input_ids"][2, : len(examples[0]["rejected_input_ids"])].tolist() == examples[0]["rejected_input_ids"]
    for example, ref in zip(examples, [(-1.0, -2.0), (-3.0, -4.0)]):
        example["ref_logps"] = ref
    assert torch.equal(collate_pairs(examples, tokenizer.pad_token_id)["ref_logps"], torch.tensor([-1., -3., -2., -4.]))


def test_both_sides_of_a_cut_pair_keep_the_same_prompt_tokens(tokenizer):
    """A short chosen and a long rejected reply under max_length: the prompt is cut once, as the longer reply needs,
    and the long reply loses its end; cut separately, the rejected side saw less of the prompt than the chosen."""
    pair = {"prompt": " ".join(["say red"] * 15), "chosen": "red", "rejected": " ".join(["blue red"] * 40)}
    (example,), stats = tokenize_preferences(tokenizer, [pair], get_template("{instruction}"), 24)
    prompts = []
    for prefix in ("", "rejected_"):
        ids, labels = example[f"{prefix}input_ids"], example[f"{prefix}labels"]
        assert len(ids) <= 24
        prompts.append([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert prompts[0] == prompts[1] and 0 < len(prompts[0]) < len(tokenizer(pair["prompt"])["input_ids"])
    assert example["labels"][-1] == tokenizer.eos_token_id  # the short reply stays whole, EOS included
    assert example["rejected_labels"][-1] != tokenizer.eos_token_id and stats.truncated == 1


def test_a_long_prompt_loses_its_start_and_a_pair_with_no_reply_token_left_is_an_error(tokenizer):
    long = {"prompt": "say red " * 20, "chosen": "red", "rejected": "blue"}
    short = {"prompt": "say red", "chosen": "red", "rejected": "blue"}
    examples, stats = tokenize_preferences(tokenizer, [long, short], get_template("{instruction}"), 12)
    assert (stats.pairs, stats.truncated, stats.dropped) == (2, 1, 0)
    # the longer side fills max_length; the other keeps the same prompt tokens
    assert max(len(examples[0]["input_ids"]), len(examples[0]["rejected_input_ids"])) == 12
    assert examples[0]["labels"][-1] == examples[0]["rejected_labels"][-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="no preference pair keeps a reply token within max_length 1"):
        tokenize_preferences(tokenizer, [{**short, "_source": "p.jsonl", "_line": 1}], get_template("seed"), 1)


def test_a_pair_whose_replies_are_the_same_is_kept_and_named_in_a_warning(tokenizer, caplog):
    pairs = [{"prompt": "say red", "chosen": "red", "rejected": "blue", "_source": "p.jsonl", "_line": 1},
             {"prompt": "say red", "chosen": "red", "rejected": "red", "_source": "p.jsonl", "_line": 2}]
    with caplog.at_level("WARNING", logger="lorakit.data.preference"):
        examples, stats = tokenize_preferences(tokenizer, pairs, get_template("seed"), 64)
    assert stats.pairs == 2
    assert [r.getMessage() for r in caplog.records] == [
        "1 preference pairs have the same chosen and rejected reply (first: p.jsonl:2); they teach nothing"]
