"""Weights & Biases: a W&B run in <run>/wandb; offline (nothing leaves the machine) unless you are logged in.

Logged in means WANDB_API_KEY is set or `wandb login` wrote its key; WANDB_MODE, WANDB_PROJECT
(default: lorakit) and the other WANDB_* variables are honoured. An offline run is uploaded
later with `wandb sync runs/NAME/wandb/offline-run-*`. Every metric is plotted against
`global_step`, so values logged for an earlier step (the base model's scores at step 0) still land.
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
        run_id = remembered_id(run_dir, "wandb") if resume_step is not None else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lorakit"), name=Path(run_dir).resolve().name,
            dir=str(run_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        remember_id(run_dir, "wandb", self.run.id)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
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
