"""Mining preference pairs from a tiny model's own samples: kept only where a sample is wrong."""

from __future__ import annotations

import json

import pytest

from conftest import TOY_TASK, toy_model_folder
from lorakit.cli import main
from lorakit.config import ConfigError
from lorakit.data.preference import check_preference_record
from lorakit.data.templates import get_template
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.infer.mine import MineConfig, mine_preferences
from lorakit.models import load_causal_lm, load_tokenizer

CHATML = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
          "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = toy_model_folder(tmp_path_factory.mktemp("mine") / "model")
    return folder, load_causal_lm(folder), load_tokenizer(folder)


def greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    return generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))


def test_pairs_are_kept_for_the_prompts_a_sample_gets_wrong(toy):
    _, model, tokenizer = toy
    template = get_template("seed")
    records = [dict(r) for r in TOY_TASK[:4]]
    own = greedy(model, tokenizer, [template.render(r)[0] for r in records])
    for record, reply in zip(records[:2], own):  # the model's own reply is the reference: never wrong
        record["output"] = reply
    # a near-zero temperature samples the greedy reply every time
    mined = mine_preferences(model, tokenizer, records, template, "ros2",
                             MineConfig(samples=3, temperature=1e-6, max_new_tokens=6))
    assert (mined.prompts, mined.sampled, mined.wrong) == (4, 12, 6)
    assert [p["prompt"] for p in mined.pairs] == [r["instruction"] for r in records[2:]]
    for pair, record, reply in zip(mined.pairs, records[2:], own[2:]):
        assert pair["chosen"] == record["output"] and pair["rejected"] == reply
        check_preference_record(pair, "mined")
    assert "2 pairs from 4 prompts: 6 of 12 samples (50.0%) scored wrong" in mined.line()


def test_every_assistant_turn_of_a_conversation_is_a_prompt(toy):
    _, model, tokenizer = toy
    tokenizer.chat_template = CHATML
    turns = [("user", "say red"), ("assistant", "red red"), ("user", "say blue"), ("assistant", "blue blue")]
    record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    mined = mine_preferences(model, tokenizer, [record], get_template("chat", tokenizer), None,
                             MineConfig(samples=2, max_new_tokens=4))
    assert mined.prompts == 2 and len(mined.pairs) == 2  # a random model gets neither right
    assert mined.pairs[1]["prompt"] == record["messages"][:3] and mined.pairs[1]["chosen"] == "blue blue"
    for pair in mined.pairs:
        check_preference_record(pair, "mined")


def test_a_scorer_without_right_or_wrong_is_refused(toy):
    _, model, tokenizer = toy
    with pytest.raises(ConfigError, match="--task e2e: its scorer rates a set of references"):
        mine_preferences(model, tokenizer, TOY_TASK, get_template("seed"), "e2e")


def test_the_command_writes_pairs_whole_and_refuses_bad_input_in_one_line(toy, tmp_path, capsys):
    folder, _, _ = toy
    data, out = tmp_path / "train.jsonl", tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOY_TASK[:3]), encoding="utf-8")
    args = ["mine-preferences", "--model", str(folder), "--data", str(data), "--template", "seed", "--task", "ros2",
            "--samples", "2", "--max-new-tokens", "4", "--output", str(out)]
    assert main(args) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == 3 and [p["chosen"] for p in pairs] == [r["output"] for r in TOY_TASK[:3]]
    assert "3 pairs from 3 prompts" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(args) == 2  # an existing output is kept
    assert "prefs.jsonl: already exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == before
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n", encoding="utf-8")
    assert main([*args, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit mine-preferences: error: ") and len(err.strip().splitlines()) == 1
    assert "train.jsonl:1: expected an instruction record" in err
    assert out.read_bytes() == before and not list(tmp_path.glob("*.partial"))
    for temperature in ("0", "nan", "inf"):
        assert main([*args[:-2], "--temperature", temperature, "--output", str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err
        assert f"--temperature: given {temperature}, expected a finite number above 0" in err, err
        assert len(err.strip().splitlines()) == 1


def test_conversations_are_checked_as_training_checks_them_before_the_model_loads(tmp_path, capsys):
    """A bad turn used to be passed over (no pair, no message) where `lorakit train` refuses the same file."""
    good = {"messages": [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red red"}]}
    bad = {"messages": [{"role": "user", "content": "say blue"}, {"role": "bot", "content": "blue blue"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    code = main(["mine-preferences", "--model", str(tmp_path / "no-model"), "--data", str(data), "--template", "seed",
                 "--task", "ros2", "--output", str(tmp_path / "prefs.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{data}:2: field 'messages[1].role' is a string 'bot'" in err[0]
    assert not (tmp_path / "prefs.jsonl").exists()
