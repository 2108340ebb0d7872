"""Multi-turn ROS 2 conversations: a user gives 2-4 commands in turn, some referring back to the last one.

Each user turn is either a fresh instruction, drawn as ``lorakit.tasks.ros2.make_split`` draws them
(the split's own phrasings and number pairs), or a follow-up whose meaning depends on the history:

    reverse   "now the other way"   the last motion with every signed quantity negated (drive: speed;
                                    turn: angle; drive_turn: both)
    double    "twice as fast"       the last motion with a speed, at twice the speed (up to 2.0 m/s)
    half      "half the speed"      the last motion with a speed, at half the speed (one decimal kept)
    again     "do that again"       the last command, whatever it was
    stop      "now stop"            stop (after a motion)

The assistant's reply to every turn is the command line of ``lorakit.tasks.ros2.render``, so the
ROS 2 scorer applies unchanged. Follow-up phrasings are cut into train/valid/test by position, as
the single-turn tables are, and a derived two-number command (a reversed drive_turn) stays in the
split that owns its pair; so the three splits share no phrasing and no number pair. The single-turn
splits are not touched: their files stay byte-identical. Records are ``{"messages": [...]}`` with a
short system prompt; ``lorakit.infer.score`` scores them per assistant turn and per conversation.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

from lorakit.tasks.ros2 import (
    _ANGLES,
    _SPEEDS,
    KIND_WEIGHTS,
    KINDS,
    SPLITS,
    TEMPLATES,
    TOPICS,
    Command,
    _Bag,
    _for_split,
    _instruction,
    _sample_command,
    number_split,
    phrasings,
    render,
)

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You turn robot instructions into ROS 2 commands, one command per reply."
DEFAULT_CHAT_SIZES = {"train": 1200, "valid": 150, "test": 200}
# How often each follow-up is drawn where it applies, against a fresh instruction ("fresh").
FOLLOW_UP_WEIGHTS = {"reverse": 3.0, "double": 6.0, "half": 6.0, "stop": 1.5, "again": 1.0, "fresh": 2.5}
MOTIONS = ("drive", "turn", "drive_turn")

FOLLOW_UPS: dict[str, tuple[str, ...]] = {  # entries 3, 7, 11 are test-only; 1 and 9 valid-only
    "reverse": ("now the other way", "the other way", "now go the other way", "same again but the other way",
                "reverse that", "now the opposite direction", "other way now", "do the opposite",
                "flip the direction", "and now the other way round", "the opposite way please",
                "now back the other way"),
    "double": ("twice as fast", "now twice as fast", "double the speed", "go twice as fast", "double it",
               "faster, twice the speed", "make it twice as fast", "now double that speed", "twice the speed please",
               "same but twice as fast", "double that", "at double the speed"),
    "half": ("half as fast", "now half the speed", "slow down to half speed", "halve the speed", "half speed",
             "go half as fast", "cut the speed in half", "slower, half the speed", "at half that speed",
             "now half as fast", "half of that speed", "reduce the speed by half"),
    "again": ("do that again", "again", "repeat that", "one more time", "same again", "once more",
              "repeat the last command", "do it again", "again please", "same thing again", "repeat", "and again"),
    # None of these is a single-turn stop instruction, alone or wrapped ("halt" + "{} now" is one).
    "stop": ("now stop", "ok now stop", "ok, stop", "that's enough, stop", "stop there", "and now stop", "and stop",
             "now halt it", "that will do, stop", "enough, stop the robot", "now halt", "all right, stop"),
}


def follow_up(kind: str, last: Command | None, previous: Command | None) -> Command | None:
    """The command follow-up ``kind`` means after ``last`` (the last motion) and ``previous`` (the last
    command), or None where it does not apply."""
    if kind == "again":
        return previous
    if last is None:
        return None
    if kind == "stop":
        return Command("stop")
    if kind == "reverse":
        speed = -last.speed if last.speed is not None else None
        angle = -last.angle_deg if last.angle_deg is not None else None
        return replace(last, speed=speed, angle_deg=angle)
    if last.speed is None:
        return None
    if kind == "double" and abs(last.speed) <= 1.0:
        return replace(last, speed=round(2 * last.speed, 1))
    if kind == "half" and round(abs(last.speed) * 10) % 2 == 0:
        return replace(last, speed=round(last.speed / 2, 1))
    return None


def make_conversations(split: str, n: int, seed: int = 0) -> list[dict]:
    """Generate ``n`` conversations for ``split``: ``{"messages": [system, user, assistant, ...]}``.

    Raises:
        ValueError: ``split`` not in ``SPLITS`` or ``n`` negative.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    templates, wrappers = phrasings(split)
    follow_ups = {kind: _for_split(texts, split) for kind, texts in FOLLOW_UPS.items()}
    rng = random.Random(f"ros2-chat:{split}:{seed}")
    by_kind = {k: [(f, t) for f in templates if TEMPLATES[f][0] == k for t in templates[f]] for k in KINDS}
    deck = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    bags = {"kind": _Bag(deck, rng), "speed": _Bag(_SPEEDS, rng), "angle": _Bag(_ANGLES, rng),
            "topic": _Bag(list(TOPICS), rng)}
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        last = previous = None
        for turn in range(rng.choice((2, 3, 4))):
            text, cmd = _next_turn(turn, split, last, previous, follow_ups, rng, bags, by_kind, wrappers)
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": render(cmd)}]
            previous = cmd
            last = cmd if cmd.kind in MOTIONS else None if cmd.kind == "stop" else last
        conversations.append({"messages": messages})
    logger.debug("made %d %s conversations (seed %d)", n, split, seed)
    return conversations


def _next_turn(turn, split, last, previous, follow_ups, rng, bags, by_kind, wrappers) -> tuple[str, Command]:
    """(user text, meant command) of one turn: a follow-up where one applies and is drawn, else fresh."""
    meant = {kind: follow_up(kind, last, previous) for kind in FOLLOW_UPS} if turn > 0 else {}
    options = [kind for kind, cmd in meant.items() if cmd is not None and number_split(cmd) in (None, split)]
    kind = rng.choices([*options, "fresh"], [FOLLOW_UP_WEIGHTS[k] for k in [*options, "fresh"]])[0]
    if kind != "fresh":
        text = rng.choice(follow_ups[kind])
        return (text[0].upper() + text[1:] if rng.random() < 0.5 else text), meant[kind]
    kind = bags["kind"].draw()
    family, template = rng.choice(by_kind[kind])
    cmd = _sample_command(family, split, rng, bags)
    return _instruction(template, cmd, wrappers, rng), cmd


def write_chat_splits(out_dir: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``chat_train.jsonl``, ``chat_valid.jsonl`` and ``chat_test.jsonl`` under ``out_dir``.

    A file that already holds the same content is left untouched.
    """
    sizes = {**DEFAULT_CHAT_SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        path = out / f"chat_{split}.jsonl"
        records = make_conversations(split, sizes[split], seed)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        logger.info("chat %s: %d conversations in %s", split, len(records), path)
        paths[split] = path
    return paths
