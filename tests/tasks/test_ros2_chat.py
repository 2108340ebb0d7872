"""Multi-turn ROS 2 conversations: follow-ups mean what they say, the splits share no phrasing or pair."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

import pytest

from lorakit.tasks.ros2 import Command, is_valid_command, number_split, render
from lorakit.tasks.ros2_chat import (
    DEFAULT_CHAT_SIZES,
    FOLLOW_UPS,
    SYSTEM_PROMPT,
    follow_up,
    make_conversations,
    write_chat_splits,
)

SPLITS = ("train", "valid", "test")


@cache
def conversations(split: str) -> tuple:
    return tuple(make_conversations(split, DEFAULT_CHAT_SIZES[split]))


@cache
def meaning() -> dict[str, Command]:
    """Every motion command line mapped back to its command (the radians of 15-degree steps are distinct)."""
    speeds = [s * k / 10 for k in range(1, 21) for s in (1, -1)]
    angles = [s * k * 15 for k in range(1, 25) for s in (1, -1)]
    cmds = [Command("drive", speed=v) for v in speeds] + [Command("turn", angle_deg=a) for a in angles]
    cmds += [Command("drive_turn", speed=v, angle_deg=a) for v in speeds for a in angles]
    return {render(c): c for c in cmds}


def turns(conversation: dict) -> list[tuple[str, str]]:
    messages = conversation["messages"]
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(1, len(messages), 2)]


def follow_up_kind(text: str) -> str | None:
    return next((kind for kind, texts in FOLLOW_UPS.items() if text.lower() in texts), None)


@pytest.mark.parametrize(
    ("kind", "last", "expected"),
    [
        ("reverse", Command("drive", speed=0.5), Command("drive", speed=-0.5)),
        ("reverse", Command("turn", angle_deg=90), Command("turn", angle_deg=-90)),
        ("reverse", Command("drive_turn", speed=0.3, angle_deg=-45), Command("drive_turn", speed=-0.3, angle_deg=45)),
        ("double", Command("drive", speed=0.7), Command("drive", speed=1.4)),
        ("double", Command("drive", speed=1.1), None),  # 2.2 m/s is beyond the grammar's 2.0
        ("double", Command("turn", angle_deg=90), None),
        ("half", Command("drive_turn", speed=-1.2, angle_deg=30), Command("drive_turn", speed=-0.6, angle_deg=30)),
        ("half", Command("drive", speed=0.5), None),  # 0.25 has two decimals
        ("stop", Command("turn", angle_deg=15), Command("stop")),
        ("stop", None, None),
    ],
)
def test_follow_ups_mean_what_they_say(kind, last, expected):
    assert follow_up(kind, last, last) == expected


def test_again_repeats_the_last_command_of_any_kind():
    echo = Command("echo", topic="/odom")
    assert follow_up("again", None, echo) == echo


@pytest.mark.parametrize("split", SPLITS)
def test_every_reply_is_a_valid_command_and_follow_ups_resolve_against_the_history(split):
    seen = Counter()
    for conversation in conversations(split):
        assert conversation["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert 2 <= len(turns(conversation)) <= 4
        last, previous = None, None  # the last motion (a Command), the last reply (a command line)
        for text, reply in turns(conversation):
            assert is_valid_command(reply)
            kind = follow_up_kind(text)
            if kind == "again" and previous is not None:
                assert reply == previous, (text, reply)
                seen[kind] += 1
            elif kind is not None and last is not None:
                assert reply == render(follow_up(kind, last, last)), (text, reply)
                seen[kind] += 1
            previous = reply
            last = meaning().get(reply, None if reply.endswith("'{}'") else last)
    assert set(seen) == set(FOLLOW_UPS), f"{split} lacks follow-ups: {set(FOLLOW_UPS) - set(seen)}"


@pytest.mark.parametrize(("a", "b"), [(a, b) for a in SPLITS for b in SPLITS if a < b])
def test_splits_share_no_user_phrasing(a, b):
    def texts(split):
        return {text.lower().rstrip(".") for c in conversations(split) for text, _ in turns(c)}

    shared = texts(a) & texts(b)
    assert not shared, sorted(shared)[:5]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_held_out_number_pairs_stay_in_their_split(split):
    pairs = 0
    for conversation in conversations(split):
        for _, reply in turns(conversation):
            cmd = meaning().get(reply)
            nav = re.search(r"x: (-?[\d.]+), y: (-?[\d.]+)", reply)
            if nav:
                cmd = Command("navigate", x=float(nav[1]), y=float(nav[2]))
            if cmd is not None and cmd.kind in ("drive_turn", "navigate"):
                assert number_split(cmd) == split, reply
                pairs += 1
    assert pairs > 10


def test_conversations_are_deterministic_and_leave_the_single_turn_files_alone(tmp_path):
    from lorakit.tasks.ros2 import write_splits

    single = write_splits(tmp_path, 50, 20, 0, 20)
    before = {split: path.read_bytes() for split, path in single.items()}
    paths = write_chat_splits(tmp_path, {"train": 30, "valid": 5, "test": 10})
    assert [p.name for p in paths.values()] == ["chat_train.jsonl", "chat_valid.jsonl", "chat_test.jsonl"]
    assert {split: path.read_bytes() for split, path in single.items()} == before
    assert make_conversations("test", 10) == make_conversations("test", 10) != make_conversations("test", 10, seed=1)
