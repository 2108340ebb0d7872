"""MLflow: one MLflow run per lorakit run, in a local store under the run folder or at $MLFLOW_TRACKING_URI.

The default store is MLflow's file store, <run>/mlruns (view with
`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/NAME/mlruns`): it needs no database and
starts at once, where a fresh SQLite store first runs its schema migrations. Set
MLFLOW_TRACKING_URI (sqlite:///..., which needs the full mlflow package, http://...) for any other
store, MLFLOW_EXPERIMENT_NAME for the experiment (default: lorakit). The config goes in as flattened
params (a mapping whose keys are patterns, such as lora.rank_pattern, as one), the metrics as metrics, the
eval samples as a table artifact (eval_samples.json, MLflow's table format) and the adapter folder
as the artifact `adapter`. A resumed run continues its MLflow run; the steps between its checkpoint
and where it stopped, which MLflow already holds, are not logged again (MLflow cannot delete points).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from pathlib import Path

from lorakit.track import flatten, remember_id, remembered_id

FOLDER = "mlruns"
PARAM_LIMIT = 6000  # MLflow's longest param value
DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")  # SQLAlchemy stores
END_STATES = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / FOLDER).as_uri()


# While the run starts: a server that does not answer is named within seconds, not after MLflow's default retries
# (7, with backoff: about four minutes); the run's own requests keep the defaults (or what the environment sets).
QUICK_START = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def quick_requests():
    given = {key: os.environ.get(key) for key in QUICK_START}
    os.environ.update({key: value for key, value in QUICK_START.items() if given[key] is None})
    try:
        yield
    finally:
        for key, value in given.items():
            if value is None:
                os.environ.pop(key, None)


class Tracker:
    def __init__(self, run_dir: Path, resume_step: int | None):
        uri = tracking_uri(run_dir)
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if uri.startswith(DATABASE_SCHEMES) and importlib.util.find_spec("sqlalchemy") is None:
            raise RuntimeError(f"a database store ({uri.split(':', 1)[0]}) needs SQLAlchemy, which mlflow-skinny does "
                               "not install; pip install mlflow (or sqlalchemy alembic)")
        with quick_requests():
            self._start(run_dir, uri, resume_step)

    def _start(self, run_dir: Path, uri: str, resume_step: int | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        known = remembered_id(run_dir, "mlflow") if resume_step is not None else None
        self.logged: dict[str, int] = {}  # a resumed MLflow run: each metric's last step, logged before the stop
        if known and self._exists(known):
            self.run_id, self.resumed = known, True
            self.client.update_run(known, status="RUNNING")
            for key in self.client.get_run(known).data.metrics:
                self.logged[key] = max((m.step for m in self.client.get_metric_history(known, key)), default=-1)
        else:
            run = self.client.create_run(experiment_id, run_name=Path(run_dir).resolve().name,
                                         tags={"lorakit.run_dir": str(Path(run_dir).resolve())})
            self.run_id, self.resumed = run.info.run_id, False
            remember_id(run_dir, "mlflow", self.run_id)
        self.new_record = resume_step is not None and not self.resumed  # replayed into (RunLog.open)

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 (MlflowException and the store's own errors: no such run here)
            return False

    def log_config(self, config: dict) -> None:
        if self.resumed:  # MLflow params cannot change; the first attempt logged them
            return
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=[
                Param(p.key, p.value[:PARAM_LIMIT]) for p in params[start : start + 100]
            ])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow keeps every point: steps the stopped attempt logged past the checkpoint are not logged twice
        metrics = [Metric(k, v, now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, columns: list[str], data: list[list]) -> None:
        self.client.log_dict(self.run_id, {"columns": columns, "data": data}, "eval_samples.json")
        tag = json.dumps([{"path": "eval_samples.json", "type": "table"}])  # what MLflow's log_table sets
        self.client.set_tag(self.run_id, "mlflow.loggedArtifacts", tag)

    def log_adapter(self, adapter_dir: Path) -> None:
        self.client.log_artifacts(self.run_id, str(adapter_dir), "adapter")

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, END_STATES.get(state, "FAILED"))
