"""1,000 varied strings for tokenizer checks: ROS 2 instructions and commands, E2E references, code,
unicode, numbers, whitespace runs. Deterministic (seeded), read from lorakit's own generator and the
shared E2E data."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from lorakit.tasks.ros2 import make_split

E2E_DEV = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "e2e" / "original" / "devset.csv"

CODE = [
    "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nnp.zeros((3, 4), dtype=np.float32)",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "const add = (a, b) => a + b; // arrow",
    "if __name__ == \"__main__\":\n\tmain()",
    "<div class=\"row\"><span>{{ value }}</span></div>",
    "x = {'a': [1, 2, 3], \"b\": (4.5, -6e-7)}",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    "ros2 launch nav2_bringup navigation_launch.py use_sim_time:=True",
]
UNICODE = [
    "Zürich café naïve résumé", "東京タワーに行きたい", "Привет, как дела?", "مرحبا بالعالم", "שלום עולם",
    "🚀🤖 launch the robot 🦙", "e\u0301 combining acute", "Ünïcödé ßtraße", "ΑΒΓ αβγ λόγος", "한국어 문장입니다",
    "emoji 👨‍👩‍👧‍👦 family", "ｆｕｌｌｗｉｄｔｈ", "math ∑∫√∞ ≤ ≥ ≠", "“quotes” ‘single’ — dash … ellipsis",
    "tab\tand\u00a0nbsp", "ไทย ภาษา", "हिन्दी पाठ", "ελληνικά 123", "¿Qué tal? ¡Bien!", "日本語とEnglishの混在",
]


def _numbers(rng: random.Random) -> list[str]:
    forms = [
        lambda: str(rng.randint(0, 10**rng.randint(1, 12))),
        lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}",
        lambda: f"{rng.randint(1, 31)}/{rng.randint(1, 12)}/{rng.randint(1900, 2100)}",
        lambda: f"{rng.uniform(0, 1):.3e}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
        lambda: f"{rng.randint(0, 999):,}{rng.randint(0, 999):03d} units at {rng.randint(1, 99)}%",
        lambda: f"0x{rng.randint(0, 2**32):08x}",
        lambda: f"move {rng.uniform(0, 5):.2f} m in {rng.randint(1, 60)} s",
    ]
    return [rng.choice(forms)() for _ in range(100)]


def _whitespace(rng: random.Random) -> list[str]:
    pieces = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "    ", "\t\t"]
    words = ["a", "ros2", "Hello", "x=1", "(", ")", "'s", "don't", "-", "."]
    out = []
    for _ in range(100):
        parts = [rng.choice(pieces if i % 2 else words) for i in range(rng.randint(1, 9))]
        out.append("".join(parts))
    return out


def _e2e(n: int) -> list[str]:
    with E2E_DEV.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [row["ref"] for row in rows[:: max(1, len(rows) // n)]][:n]


def probe_strings() -> list[str]:
    rng = random.Random(0)
    ros2 = make_split("test", 200, seed=0)
    strings = [r["instruction"] for r in ros2] + [r["output"] for r in ros2]  # 400
    strings += _e2e(250)
    strings += [rng.choice(["\n", "\n\n", "  "]).join(rng.sample(CODE, rng.randint(1, 3))) for _ in range(130)]
    strings += [" ".join(rng.sample(UNICODE, rng.randint(1, 3))) for _ in range(20)]
    strings += _numbers(rng) + _whitespace(rng)
    assert len(strings) == 1000, len(strings)
    return strings
