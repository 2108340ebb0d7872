"""metrics.jsonl (one JSON object per logged event) and curves.png drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.atomic_files import write_atomically


class MetricsLog:
    """Appends events to `<run>/metrics.jsonl`; `plot()` draws the curves from that file."""

    def __init__(self, run_dir: str | Path, resume: bool = False, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled  # False on the processes of a data-parallel run other than rank 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.path.write_text("", encoding="utf-8")

    def write(self, **event) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event, sort_keys=True) + "\n")

    def events(self) -> list[dict]:
        """The events written so far; a line that does not parse (the end of one a killed run was writing) is
        left out, as the dashboard leaves it out."""
        if not self.enabled or not self.path.is_file():
            return []
        events = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def truncate_after(self, step: int) -> None:
        """Drop events past `step`, so a resumed run does not log the same steps twice. A divergence rollback to a step
        at or before `step` stays (stamped with the later step that diverged): it still marks the events before it
        that the run abandoned, for `kept_events`."""
        if not self.enabled:
            return

        def kept(e: dict) -> bool:
            at = e.get("step", 0)
            back = e.get("to_step")
            return (not _number(at) or at <= step
                    or e.get("kind") == "rollback" and _number(back) and back <= step)

        kept = [e for e in self.events() if kept(e)]
        write_atomically(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Loss (train and eval) and every other eval metric against the step, as a PNG."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        events = kept_events(self.events())
        train = [(e["step"], e["loss"]) for e in events if e.get("kind") == "train"]
        evals = [e for e in events if e.get("kind") == "eval"]
        others = sorted(
            {k for e in evals for k, v in e.items() if k.startswith("eval_") and k != "eval_loss" and _number(v)}
        )
        train_accuracy = [(e["step"], e["accuracy"]) for e in events if e.get("kind") == "train" and "accuracy" in e]
        if train_accuracy:
            others.append("train_accuracy")
        fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 5 * bool(others), 4), squeeze=False)
        ax = axes[0][0]
        if train:
            ax.plot(*zip(*train), label="train loss")
        losses = [(e["step"], e["eval_loss"]) for e in evals if "eval_loss" in e]
        if losses:
            ax.plot(*zip(*losses), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        if others:
            ax2 = axes[0][1]
            for key in others:
                points = train_accuracy if key == "train_accuracy" else [(e["step"], e[key]) for e in evals if key in e]
                ax2.plot(*zip(*points), "-" if key == "train_accuracy" else "o-", label=key)
            ax2.set_xlabel("step")
            ax2.legend()
        fig.tight_layout()
        out = Path(path) if path else self.path.with_name("curves.png")
        tmp = out.with_name(f".{out.name}-{os.getpid()}.png")  # the dashboard serves it while a run redraws it
        try:
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, out)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
        return out


def kept_events(events: list[dict]) -> list[dict]:
    """The events of the timeline a run kept: the train and eval events a divergence rollback dropped (logged before
    it, for the steps after the one it went back to, up to the one that diverged) are left out. metrics.jsonl keeps
    them, and the rollback event, as the record of what happened; curves and best scores read this."""
    out: list[dict] = []
    for event in events:
        if event.get("kind") == "rollback" and _number(event.get("to_step")) and _number(event.get("step")):
            out = [e for e in out if e.get("kind") not in ("train", "eval") or not _number(e.get("step"))
                   or not event["to_step"] < e["step"] <= event["step"]]
        out.append(event)
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
