"""ROS 2 instruction→command data: a generator with held-out valid and test splits, and its scorer.

Grammar (one output per instruction; every number formatted exactly as shown)::

    drive       ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{linear: {x: 0.5}}'
    turn        ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{angular: {z: 1.57}}'
    drive_turn  ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{linear: {x: 0.3}, angular: {z: -0.79}}'
    stop        ros2 topic pub /cmd_vel geometry_msgs/msg/Twist '{}'
    navigate    ros2 action send_goal /navigate_to_pose nav2_msgs/action/NavigateToPose
                    '{pose: {pose: {position: {x: 2.0, y: 3.0}}}}'      (one line)
    topic_list  ros2 topic list
    node_list   ros2 node list
    echo        ros2 topic echo /odom             (a topic from TOPICS)

Speeds are m/s with one decimal, backward negative. Angles are multiples of 15 degrees up to 360,
written as radians rounded to 2 decimals, left (counter-clockwise) positive; a turn with no angle
is 90 degrees. Coordinates are -10..10 with one decimal.

Split rule: every phrasing table (templates per family, politeness wrappers) is cut by position:
every ``HOLDOUT_EVERY``-th entry is test-only, and of the rest every ``VALID_EVERY``-th (from
``VALID_OFFSET``) is valid-only, so the three splits share no phrasing. Numbers: the two-number
commands (drive_turn's (speed, angle), navigate's (x, y)) are test-only when a CRC of the tuple
falls in one fifth of the range and valid-only when it falls in another tenth, so neither held-out
split's pairs are seen in train or in the other. The valid split thus measures what the test split
measures (unseen phrasings, unseen number pairs) on other phrasings and pairs, so a checkpoint can
be chosen on it without looking at test. Single speeds and angles form small closed sets that a
model has to learn whole, so every split uses them all (train cycles through every value); only
their phrasing differs. The test split of a seed is the same whatever the other splits hold.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import string
import zlib
from dataclasses import dataclass
from pathlib import Path

from lorakit.tasks.ros2_phrasings import (  # noqa: F401 (the tables are part of this module's API)
    COORD_FORMATS,
    DEGREE_UNITS,
    NO_WRAP_STARTS,
    SIGNED_SLOTS,
    SPEED_UNITS,
    TEMPLATES,
    TOPIC_PHRASES,
    WORD_SLOTS,
    WRAPPERS,
)

logger = logging.getLogger(__name__)

KINDS = ("drive", "turn", "drive_turn", "stop", "navigate", "topic_list", "node_list", "echo")
TOPICS = ("/odom", "/scan", "/imu", "/battery_state", "/camera/image_raw", "/tf", "/cmd_vel")
SPLITS = ("train", "valid", "test")
DEFAULT_SIZES = {"train": 2000, "valid": 200, "test": 200}
HOLDOUT_EVERY = 4  # entries 3, 7, 11, ... of each phrasing table are test-only
VALID_EVERY, VALID_OFFSET = 8, 1  # entries 1, 9, 17, ... are valid-only (never a test position)
# How often each kind is drawn: the parameterised kinds evenly, stop/list/echo less often.
KIND_WEIGHTS = {"drive": 6, "turn": 6, "drive_turn": 6, "navigate": 6,
                "stop": 2, "topic_list": 2, "node_list": 2, "echo": 3}

_TWIST = "ros2 topic pub /cmd_vel geometry_msgs/msg/Twist"
_NAV = "ros2 action send_goal /navigate_to_pose nav2_msgs/action/NavigateToPose"


@dataclass(frozen=True)
class Command:
    """One command of the grammar; only the fields its kind uses are set.

    Attributes:
        kind: one of ``KINDS``.
        speed: m/s, one decimal, negative backward (drive, drive_turn).
        angle_deg: signed multiple of 15 within ±360, left positive (turn, drive_turn).
        x: goal x in -10..10, one decimal (navigate).
        y: goal y in -10..10, one decimal (navigate).
        topic: one of ``TOPICS`` (echo).
    """

    kind: str
    speed: float | None = None
    angle_deg: int | None = None
    x: float | None = None
    y: float | None = None
    topic: str | None = None

    def __post_init__(self) -> None:
        needs = {"drive": ("speed",), "turn": ("angle_deg",), "drive_turn": ("speed", "angle_deg"),
                 "navigate": ("x", "y"), "echo": ("topic",)}
        if self.kind not in KINDS:
            raise ValueError(f"Command kind {self.kind!r} is not one of {KINDS}")
        missing = [f for f in needs.get(self.kind, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"Command kind {self.kind!r} needs {missing} set")
        if self.angle_deg is not None and (self.angle_deg % 15 or not 0 < abs(self.angle_deg) <= 360):
            raise ValueError(f"angle_deg {self.angle_deg} must be a non-zero multiple of 15 within ±360")
        for name in ("x", "y"):
            value = getattr(self, name)
            if value is not None and abs(value) > 10:
                raise ValueError(f"{name}={value} is outside -10..10")
        if self.topic is not None and self.topic not in TOPICS:
            raise ValueError(f"topic {self.topic!r} is not one of {TOPICS}")


def _one_decimal(value: float) -> str:
    return f"{round(value, 1) + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0


def _radians(angle_deg: int) -> str:
    return f"{round(math.radians(angle_deg), 2):.2f}"


def render(cmd: Command) -> str:
    """The one place the output format is defined: the command line for ``cmd``.

    A twist shows ``linear`` when a speed is set and ``angular`` when an angle is, in that order,
    so a turn given a speed renders as drive-and-turn, and stop renders ``'{}'``.
    """
    if cmd.kind in ("drive", "turn", "drive_turn", "stop"):
        parts = []
        if cmd.speed is not None:
            parts.append(f"linear: {{x: {_one_decimal(cmd.speed)}}}")
        if cmd.angle_deg is not None:
            parts.append(f"angular: {{z: {_radians(cmd.angle_deg)}}}")
        return f"{_TWIST} '{{{', '.join(parts)}}}'"
    if cmd.kind == "navigate":
        position = f"{{x: {_one_decimal(cmd.x)}, y: {_one_decimal(cmd.y)}}}"
        return f"{_NAV} '{{pose: {{pose: {{position: {position}}}}}}}'"
    if cmd.kind == "echo":
        return f"ros2 topic echo {cmd.topic}"
    return "ros2 topic list" if cmd.kind == "topic_list" else "ros2 node list"


# The seed notebook's five examples, with their meaning; render() must give the seed's outputs.
SEED_EXAMPLES: tuple[tuple[str, Command], ...] = (
    ("Move robot forward at 0.5 m/s", Command("drive", speed=0.5)),
    ("Turn robot left 90 degrees", Command("turn", angle_deg=90)),
    ("Stop the robot", Command("stop")),
    ("Navigate to position x=2, y=3", Command("navigate", x=2.0, y=3.0)),
    ("Rotate robot clockwise", Command("turn", angle_deg=-90)),
)


# ---- splitting the phrasing tables (lorakit.tasks.ros2_phrasings) ------------------------------------
def _position_split(i: int) -> str:
    """The split that owns entry ``i`` of a phrasing table."""
    if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
        return "test"
    return "valid" if i % VALID_EVERY == VALID_OFFSET else "train"


def _for_split(items: tuple[str, ...], split: str) -> tuple[str, ...]:
    return tuple(x for i, x in enumerate(items) if _position_split(i) == split)


def phrasings(split: str) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """The templates (by family) and wrappers that ``split`` draws from; the splits share none.

    Raises:
        ValueError: ``split`` not in ``SPLITS``.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return {f: _for_split(t, split) for f, (_, t) in TEMPLATES.items()}, _for_split(WRAPPERS, split)


def number_split(cmd: Command) -> str | None:
    """The split that owns ``cmd``'s number pair (test: a fifth of the pairs by CRC, valid: another
    tenth, train: the rest), or None for a command without two numbers (every split uses those)."""
    if cmd.kind not in ("drive_turn", "navigate"):
        return None
    crc = zlib.crc32(repr((cmd.kind, cmd.speed, cmd.angle_deg, cmd.x, cmd.y)).encode())
    if crc % 5 == 0:
        return "test"
    return "valid" if crc % 10 == 1 else "train"  # crc % 10 == 1 implies crc % 5 == 1: never a test pair


def held_out_numbers(cmd: Command) -> bool:
    """Whether ``cmd``'s numbers are test-only: a fifth of the two-number tuples, by CRC."""
    return number_split(cmd) == "test"


# ---- generation -----------------------------------------------------------------------------------
class _Bag:
    """Draws from shuffled rounds of ``values``, so every value comes up once per round."""

    def __init__(self, values: list, rng: random.Random) -> None:
        self._values, self._rng, self._left = values, rng, []

    def draw(self):
        if not self._left:
            self._left = list(self._values)
            self._rng.shuffle(self._left)
        return self._left.pop()


_SPEEDS = [s * k / 10 for k in range(1, 21) for s in (1, -1)]  # ±0.1 .. ±2.0
_ANGLES = [s * k * 15 for k in range(1, 25) for s in (1, -1)]  # ±15 .. ±360


def _number(value: float, rng: random.Random) -> str:
    """A whole number is sometimes written without its ``.0`` ("x=2"), as people do."""
    return str(int(value)) if value == int(value) and rng.random() < 0.5 else _one_decimal(value)


def _sample_command(family: str, split: str, rng: random.Random, bags: dict[str, _Bag]) -> Command:
    kind = TEMPLATES[family][0]
    if family in ("drive", "reverse"):
        speed = bags["speed"].draw()
        return Command(kind, speed=-abs(speed) if family == "reverse" else speed)
    if family in ("turn", "turn90"):
        return Command(kind, angle_deg=bags["angle"].draw() if family == "turn" else rng.choice((90, -90)))
    if kind in ("drive_turn", "navigate"):
        while True:  # rejection sampling: each split keeps the tuples it owns (see number_split)
            if kind == "navigate":
                whole = rng.random() < 0.5
                x, y = ((rng.randint(-10, 10), rng.randint(-10, 10)) if whole
                        else (rng.randint(-100, 100) / 10, rng.randint(-100, 100) / 10))
                cmd = Command(kind, x=float(x), y=float(y))
            else:
                angle = rng.choice(_ANGLES) if family == "drive_turn" else rng.choice((90, -90))
                cmd = Command(kind, speed=rng.choice(_SPEEDS), angle_deg=angle)
            if number_split(cmd) == split:
                return cmd
    if kind == "echo":
        return Command(kind, topic=bags["topic"].draw())
    return Command(kind)


def _fill(template: str, cmd: Command, rng: random.Random) -> str:
    values = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if name in WORD_SLOTS:
            values[name] = rng.choice(WORD_SLOTS[name])
        elif name in SIGNED_SLOTS:
            sign = cmd.speed if name == "dir" else cmd.angle_deg
            values[name] = rng.choice(SIGNED_SLOTS[name][0 if sign > 0 else 1])
        elif name == "speed":
            values[name] = _number(abs(cmd.speed), rng) + rng.choice(SPEED_UNITS)
        elif name == "angle":
            values[name] = f"{abs(cmd.angle_deg)}{rng.choice(DEGREE_UNITS)}"
        elif name == "angle_adj":
            values[name] = f"{abs(cmd.angle_deg)}{rng.choice(('-degree', ' degree'))}"
        elif name == "xy":
            values[name] = rng.choice(COORD_FORMATS).format(x=_number(cmd.x, rng), y=_number(cmd.y, rng))
        elif name == "topic":
            values[name] = rng.choice(TOPIC_PHRASES[cmd.topic])
    return template.format(**values)


def _instruction(template: str, cmd: Command, wrappers: tuple[str, ...], rng: random.Random) -> str:
    text = _fill(template, cmd, rng)
    if rng.random() < 0.5 and not template.endswith("?") and not template.lower().startswith(NO_WRAP_STARTS):
        text = rng.choice(wrappers).format(text)
    if rng.random() < 0.6:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.15 and not text.endswith("?") and not text[-1].isdigit():  # "y=3." reads badly
        text += "."
    return text


def make_split(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Generate ``n`` ``{"instruction", "output"}`` records for ``split``; deterministic in all three.

    Kinds are drawn in shuffled rounds weighted by ``KIND_WEIGHTS``; instructions are unique
    within the split as far as the phrasing space allows.

    Raises:
        ValueError: ``split`` not in ``SPLITS`` or ``n`` negative.
    """
    templates, wrappers = phrasings(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"ros2:{split}:{seed}")  # str seeds are hashed stably across runs
    by_kind = {k: [(f, t) for f in templates if TEMPLATES[f][0] == k for t in templates[f]] for k in KINDS}
    deck = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    bags = {"kind": _Bag(deck, rng), "speed": _Bag(_SPEEDS, rng), "angle": _Bag(_ANGLES, rng),
            "topic": _Bag(list(TOPICS), rng)}
    records, seen = [], set()
    for _ in range(n):
        kind = bags["kind"].draw()
        for _attempt in range(30):  # a few retries to avoid duplicate instructions
            family, template = rng.choice(by_kind[kind])
            cmd = _sample_command(family, split, rng, bags)
            text = _instruction(template, cmd, wrappers, rng)
            if text.lower() not in seen:
                break
        seen.add(text.lower())
        records.append({"instruction": text, "output": render(cmd)})
    logger.debug("made %d %s records (seed %d)", n, split, seed)
    return records


def write_splits(
    out_dir: str | Path,
    n_train: int = DEFAULT_SIZES["train"],
    n_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    n_valid: int = DEFAULT_SIZES["valid"],
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (UTF-8, one object a line) under ``out_dir``.

    A file that already holds the same content is left untouched.

    Returns:
        ``{"train": path, "valid": path, "test": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        path = out / f"{split}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_split(split, n, seed))
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        logger.info("%s: %d records in %s", split, n, path)
        paths[split] = path
    return paths


# ---- scoring --------------------------------------------------------------------------------------
_N1 = r"-?(?:0|[1-9]\d*)\.\d"  # one decimal
_N2 = r"-?(?:0|[1-9]\d*)\.\d\d"  # two decimals


def _form(cmd: Command, numbers: dict[str, str]) -> re.Pattern:
    """``render(cmd)`` as a regex, each sample value in it replaced by the pattern it stands for."""
    pattern = re.escape(render(cmd))
    for sample, replacement in numbers.items():
        pattern = pattern.replace(re.escape(sample), replacement)
    return re.compile(pattern)


# Built from render() so the format is still defined in one place.
_FORMS = {
    "stop": _form(Command("stop"), {}),
    "drive": _form(Command("drive", speed=0.1), {"0.1": _N1}),
    "turn": _form(Command("turn", angle_deg=15), {"0.26": _N2}),
    "drive_turn": _form(Command("drive_turn", speed=0.1, angle_deg=15), {"0.1": _N1, "0.26": _N2}),
    "navigate": _form(Command("navigate", x=1.1, y=2.2), {"1.1": _N1, "2.2": _N1}),
    "topic_list": _form(Command("topic_list"), {}),
    "node_list": _form(Command("node_list"), {}),
    "echo": _form(Command("echo", topic="/odom"), {"/odom": "(?:" + "|".join(map(re.escape, TOPICS)) + ")"}),
}


def normalise(text: str) -> str:
    """Strip the ends and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> bool:
    """Whether ``pred`` equals ``ref`` up to whitespace (see ``normalise``)."""
    return normalise(pred) == normalise(ref)


def command_kind(text: str) -> str | None:
    """The kind of grammar form ``text`` parses as (after ``normalise``), or None if none."""
    text = normalise(text)
    return next((kind for kind, form in _FORMS.items() if form.fullmatch(text)), None)


def is_valid_command(text: str) -> bool:
    """Whether ``text`` is one command of the grammar, numbers well-formed and topic known."""
    return command_kind(text) is not None


def score(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Exact-match and valid-command rates of ``preds`` against ``refs``, as fractions (0.0 if empty).

    Raises:
        ValueError: the lists differ in length.
    """
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references; pass one per reference")
    n = len(refs)
    if n == 0:
        return {"exact_match": 0.0, "valid_rate": 0.0, "n": 0}
    return {"exact_match": sum(map(exact_match, preds, refs)) / n,
            "valid_rate": sum(map(is_valid_command, preds)) / n, "n": n}
