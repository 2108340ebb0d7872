"""Weights & Biases: a W&B run in <run>/wandb; offline (nothing leaves the machine) unless you are logged in.

Logged in means WANDB_API_KEY is set or `wandb login` wrote its key; WANDB_MODE, WANDB_PROJECT
(default: lorakit) and the other WANDB_* variables are honoured. Every metric is plotted against
`global_step`, so values logged for an earlier step (the base model's scores at step 0) still land.

A resumed run continues its online W&B run; the steps between its checkpoint and where it stopped,
which W&B already holds, are not logged again. W&B cannot resume an offline run (a second offline
folder with the same id replaces the first's history when synced), so a resumed offline run starts
a new W&B run that gets the steps metrics.jsonl kept: upload the newest one, `wandb sync
runs/NAME/wandb/offline-run-...` (the folder `trackers.json` names).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lorakit.track import remember_id, remembered_id

EXIT_CODES = {"finished": 0, "interrupted": 255, "failed": 1}


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    def __init__(self, run_dir: Path, resume_step: int | None):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
        run_id = remembered_id(run_dir, "wandb") if resume_step is not None and mode == "online" else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lorakit"), name=Path(run_dir).resolve().name,
            dir=str(run_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        remember_id(run_dir, "wandb", self.run.id)
        resumed = run_id is not None and self.run.resumed
        self.new_record = resume_step is not None and not resumed  # replayed into (RunLog.open)
        # a resumed online run holds the stopped attempt's steps up to its last global_step: not logged twice
        last = self.run.summary.get("global_step") if resumed else None
        self.logged_step = int(last) if isinstance(last, (int, float)) else -1
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if 0 < step <= self.logged_step:
            return
        self.run.log({"global_step": step, **values})

    def log_samples(self, columns: list[str], data: list[list]) -> None:
        import wandb

        self.run.log({"eval_samples": wandb.Table(columns=columns, data=[[_plain(v) for v in r] for r in data])})

    def log_adapter(self, adapter_dir: Path) -> None:
        self.run.summary["adapter_dir"] = str(adapter_dir)

    def close(self, state: str) -> None:
        self.run.finish(exit_code=EXIT_CODES.get(state, 1))


def _plain(value):
    return value if isinstance(value, (int, float, str)) or value is None else str(value)
