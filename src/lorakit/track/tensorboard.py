"""TensorBoard: event files in <run>/tensorboard through torch.utils.tensorboard.

View with `tensorboard --logdir runs/`. A resumed run purges the events past its checkpoint, as
metrics.jsonl does, and a fresh run (train.overwrite_output_dir) all of an earlier run's. The config and
the eval samples are text entries (Markdown tables).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lorakit.track import flatten

FOLDER = "tensorboard"


class Tracker:
    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(run_dir) / FOLDER
        earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        self.new_record = not earlier  # a resumed run's earlier steps are replayed into it (RunLog.open)
        # a resumed run hides the steps past its checkpoint; a fresh run over an earlier one (overwrite) all of them
        purge = (resume_step + 1 if resume_step is not None else 0) if earlier else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge, flush_secs=10)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        rows = [f"| {key} | {_cell(value)} |" for key, value in flatten(config).items()]
        self.writer.add_text("config_table", "| key | value |\n|---|---|\n" + "\n".join(rows), 0)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_samples(self, columns: list[str], data: list[list]) -> None:
        head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        self.writer.add_text("eval_samples", head + "\n".join("| " + " | ".join(map(_cell, r)) + " |" for r in data))

    def rollback(self, to_step: int) -> None:
        """A divergence rollback to `to_step`: the points past it are dropped, as a resume's purge drops them."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=to_step + 1, session_log=SessionLog(status=SessionLog.START)))

    def log_adapter(self, adapter_dir: Path) -> None:
        self.writer.add_text("adapter", f"`{adapter_dir}`")

    def close(self, state: str) -> None:
        self.writer.close()


def _cell(value) -> str:
    """A Markdown table cell: pipes escaped, newlines as <br>."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")
