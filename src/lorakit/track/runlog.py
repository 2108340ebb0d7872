"""RunLog: the one object a run writes its events through.

metrics.jsonl is always written; every tracker of `train.report_to` gets the same numbers at the
same steps, the resolved config, the eval samples as a table and the adapter. Only rank 0 of a
data-parallel run writes (`enabled=False` elsewhere). A tracker that fails mid-run (a tracking
server gone away) is dropped with a warning rather than stopping the training.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import yaml

from lorakit.atomic_files import write_atomically
from lorakit.checkpoint.run_folder import clear_earlier_run
from lorakit.config import ConfigError
from lorakit.track import metric_values, missing, open_tracker, requested
from lorakit.track.samples import table, write_samples
from lorakit.track.status import write_status
from lorakit.train.metrics import MetricsLog, kept_events

log = logging.getLogger(__name__)


class RunLog:
    def __init__(self, run_dir: str | Path, report_to: list[str] | str | None = None, config: dict | None = None,
                 enabled: bool = True, replace: bool = False):
        """Check that the trackers are installed (ConfigError naming the pip install if not); open nothing yet.
        `replace`: the folder's earlier run (train.overwrite_output_dir) is removed when training begins."""
        self.run_dir = Path(run_dir)
        self.replace = replace
        self.names = requested(report_to)
        problems = missing(self.names)
        if problems:
            raise ConfigError.of(problems)
        self.config = config or {}
        self.enabled = enabled
        self.jsonl: MetricsLog | None = None
        self.trackers: dict[str, object] = {}
        self.started = False  # training began: the folder now holds this run (see `open`)
        self.sent_step = -1  # the highest train/eval step sent to the trackers
        # after a divergence rollback: (the step it went back to, the highest step sent before it); the kept
        # timeline's events for those steps go only to the trackers that dropped the old ones (`rollback`)
        self.rolled_back: tuple[int, int] | None = None

    def open(self, resume_step: int | None = None) -> RunLog:
        """Training begins: run_config.yaml (the config given) and status.json (running) are written now, not
        before, so that a run that fails while loading, or whose trackers cannot start, leaves a folder's
        earlier run as it was. Start the trackers, then metrics.jsonl afresh, or kept up to `resume_step` when
        resuming (a tracker new to the run then gets the kept steps)."""
        started = self.enabled and not self.trackers
        if started:  # first: a tracker that cannot start leaves the folder's files as they were
            self._open_trackers(resume_step)
        self._start()
        self.jsonl = MetricsLog(self.run_dir, resume=resume_step is not None, enabled=self.enabled)
        if resume_step is not None:
            self.jsonl.truncate_after(resume_step)
        if started:
            self._each("log_config", self.config)
            if resume_step is not None:
                self._replay_kept_steps()
        return self

    def _open_trackers(self, resume_step: int | None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard last: on a resume it drops the steps past the checkpoint as it starts, which a tracker that
        # then failed to start would leave dropped for a resume that never happened
        for name in sorted(self.names, key=lambda n: n == "tensorboard"):
            try:
                self.trackers[name] = open_tracker(name, self.run_dir, resume_step)
            except Exception as err:  # noqa: BLE001 (any failure to start: an unreachable server, a refused store)
                self._each("close", "failed")
                self.trackers = {}
                raise ConfigError(f"train.report_to: {name} could not start ({_first_line(err)})") from None

    def _replay_kept_steps(self) -> None:
        """A tracker that holds nothing of this run yet (turned on at resume, or its record gone) gets the steps
        metrics.jsonl kept, so it shows the whole run."""
        fresh = {name: t for name, t in self.trackers.items() if getattr(t, "new_record", False)}
        if not fresh:
            return
        for event in kept_events(self.jsonl.events()):  # a divergence rollback's dropped steps left out
            values = metric_values(event)
            if values and "step" in event:
                for name, tracker in list(fresh.items()):
                    try:
                        tracker.log_metrics(int(event["step"]), values)
                    except Exception as err:  # noqa: BLE001 (as in _each: the tracker is dropped, the run goes on)
                        log.warning("%s tracker: replaying the kept steps failed (%s); it logs nothing more", name,
                                    err)
                        fresh.pop(name)
                        self.trackers.pop(name, None)
                        with contextlib.suppress(Exception):
                            tracker.close("failed")

    def write(self, **event) -> None:
        """One event (kind, step, numbers) to metrics.jsonl and, its numbers, to every tracker.

        After a divergence rollback (a `rollback` event) a tracker that can drop points (TensorBoard) drops the
        steps the run abandoned and gets the kept ones; one that cannot (MLflow, W&B) keeps what it holds for those
        steps and gets the kept timeline from the first step past them, so no tracker holds a step twice."""
        if self.jsonl is None:  # written to without the loop having opened it: append
            self.jsonl = MetricsLog(self.run_dir, resume=True, enabled=self.enabled)
        self.jsonl.write(**event)
        if event.get("kind") == "rollback" and isinstance(event.get("to_step"), int):
            self.rolled_back = (event["to_step"], self.sent_step)
            self._each("rollback", event["to_step"], only=lambda tracker: hasattr(tracker, "rollback"))
        values = metric_values(event)
        if not values or "step" not in event:
            return
        step = int(event["step"])
        timeline = event.get("kind") in ("train", "eval")
        held = timeline and self.rolled_back is not None and self.rolled_back[0] < step <= self.rolled_back[1]
        self._each("log_metrics", step, values, only=(lambda tracker: hasattr(tracker, "rollback")) if held else None)
        if timeline:
            self.sent_step = max(self.sent_step, step)

    def events(self) -> list[dict]:
        return self.jsonl.events() if self.jsonl else []

    def plot(self) -> Path | None:
        return self.jsonl.plot() if self.jsonl else None

    def log_samples(self, rows: list[dict]) -> None:
        """samples.jsonl beside metrics.jsonl, and the rows as a table in each tracker."""
        if not self.enabled:
            return
        write_samples(self.run_dir, rows)
        columns, data = table(rows)
        self._each("log_samples", columns, data)

    def log_adapter(self, adapter_dir: str | Path | None) -> None:
        if self.enabled and adapter_dir and Path(adapter_dir).is_dir():
            self._each("log_adapter", Path(adapter_dir))

    @contextlib.contextmanager
    def running(self):
        """status.json says running from the start of training (`open`), then finished, interrupted or failed;
        trackers close. A run that ends before training began writes nothing."""
        try:
            yield self
        except KeyboardInterrupt:
            self._end("interrupted", error="interrupted")
            raise
        except BaseException as err:
            self._end("failed", error=f"{type(err).__name__}: {_first_line(err)}")
            raise
        self._end("finished")

    def _start(self) -> None:
        if self.started or not self.enabled:
            return
        self.started = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.replace:
            clear_earlier_run(self.run_dir)
        if self.config:
            write_atomically(self.run_dir / "run_config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        write_status(self.run_dir, "running", report_to=self.names)

    def _end(self, state: str, **fields) -> None:
        if not self.enabled or not self.started:
            return
        self._each("close", state)
        self.trackers = {}
        try:
            write_status(self.run_dir, state, report_to=self.names, **fields)
        except OSError as err:  # never hide the run's own error behind this one
            log.warning("could not write %s/status.json (%s)", self.run_dir, err.strerror)

    def _each(self, method: str, *args, only=None) -> None:
        """Call `method` on every tracker (those `only` accepts); one that fails is closed (as failed) and dropped."""
        for name, tracker in list(self.trackers.items()):
            if only is not None and not only(tracker):
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 (a tracker's trouble must not cost the run)
                log.warning("%s tracker: %s failed (%s); it logs nothing more for this run", name, method, err)
                self.trackers.pop(name, None)
                if method != "close":
                    with contextlib.suppress(Exception):  # its run marked failed rather than left running
                        tracker.close("failed")


def _first_line(err: BaseException) -> str:
    """The error's first line; for a settings validation error (pydantic's, as W&B raises) the field and the reason
    too, which its first line ("1 validation error for Settings") leaves out."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "validation error" in lines[0] and len(lines) > 2:
        return f"{lines[0]}: {lines[1]}: {lines[2]}"
    return lines[0]
