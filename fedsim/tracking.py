"""Sending a run's results to the experiment trackers `[output]` enables: MLflow, TensorBoard.

The run writer tells its trackers when the run starts, after every finished round and when it
stops. Trackers are an optional extra (`pip install -e ".[tracking]"`), imported only when
enabled, and only the process that runs the rounds tracks (the driver, or a deployment's server).
A tracker that fails is dropped with one warning in the run's log; the run and its files go on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import numbers
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedsim.config import ExperimentConfig, OutputSection, flat_keys
from fedsim.errors import ConfigError

MODULES = {"mlflow": "mlflow", "tensorboard": "torch.utils.tensorboard"}  # by output key
STATE_FILE = "tracking.json"  # the MLflow run of a run directory (or comparison folder)
STATUSES = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call

# (tracking URI, run id) of the comparison whose cells run now: their MLflow runs nest under it
_parent: ContextVar[tuple[str, str] | None] = ContextVar("fedsim_mlflow_parent", default=None)


def _require(key: str) -> Any:
    """The module behind `output.<key>`; a ConfigError saying what to install when it is missing."""
    try:
        return importlib.import_module(MODULES[key])
    except ImportError as exc:
        raise ConfigError(f"output.{key} is set but {key} cannot be imported ({exc}): install the "
                          'tracking extra, pip install -e ".[tracking]"') from None


def check_installed(output: OutputSection) -> None:
    """Refuse an enabled tracker that is not installed, before anything runs."""
    for key in MODULES:
        if getattr(output, key):
            _require(key)


def numbers_of(row: dict[str, Any]) -> dict[str, float]:
    """A results row's numeric values by name, its round (the step) aside."""
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, numbers.Real)}


class Tracker(Protocol):
    """What a tracker is told about one run."""

    name: str

    def start(self, config: ExperimentConfig, resume_after: int | None) -> None:
        """A new run, or (`resume_after` = r) one continued after round r."""

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        """A finished round: its row of the rounds table, its clients' rows."""

    def stop(self, status: str) -> None:
        """The run stopped: "finished", "failed" or "interrupted"."""


class Trackers:
    """The trackers of one run; one that raises is dropped with a single warning (in the run's
    log, with `log`, and on stderr) and the others go on."""

    def __init__(self, trackers: list[Tracker], log: Callable[[str], None] | None = None) -> None:
        self.trackers, self.log = trackers, log

    def call(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                self.trackers.remove(tracker)
                reason = (str(exc).strip().splitlines() or [""])[0][:300]
                warning = (f"warning: {tracker.name} tracking failed ({type(exc).__name__}: {reason}); "
                           "the run goes on without it, its results are in the run directory")
                if self.log is not None:
                    self.log(warning)
                print(warning, file=sys.stderr)

    def start(self, config: ExperimentConfig, resume_after: int | None) -> None:
        self.call("start", config, resume_after)

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        self.call("add_round", row, client_rows)

    def stop(self, status: str) -> None:
        self.call("stop", status)


def open_trackers(config: ExperimentConfig, run_dir: Path, log: Callable[[str], None]) -> Trackers:
    """The trackers `config.output` enables for the run in `run_dir` (a ConfigError if one is not
    installed). TensorBoard comes first, so its files are complete when MLflow collects them."""
    trackers: list[Tracker] = []
    if config.output.tensorboard:
        trackers.append(TensorBoardTracker(run_dir))
    if config.output.mlflow:
        trackers.append(MlflowTracker(config.output, run_dir))
    return Trackers(trackers, log)


def mlflow_store(output: OutputSection) -> tuple[str, str | None]:
    """`output.mlflow` as a tracking URI and the artifact location of new experiments: true is a
    SQLite store with its artifacts in output.dir (no server, not the working directory); a URI's
    experiments keep their server's artifact store."""
    if output.mlflow is True:
        return (f"sqlite:///{(output.dir / 'mlflow.db').resolve()}",
                (output.dir / "mlartifacts").resolve().as_uri())
    return output.mlflow, None


class MlflowTracker:
    """A run as one MLflow run: its resolved config as params, every round's metrics at their
    round as step, its directory as artifacts and its status when it stops. `tracking.json` in
    the folder names the run, so a resumed run continues it (rounds logged before are not again)."""

    name = "MLflow"

    def __init__(self, output: OutputSection, folder: Path) -> None:
        self.mlflow = _require("mlflow")
        self.output, self.folder = output, Path(folder)
        self.uri, self.artifact_location = mlflow_store(output)
        self.client: Any = None
        self.run_id, self.logged = "", -1  # the MLflow run and the last round logged to it

    def open(self, experiment: str, resume: bool, tags: dict[str, str]) -> bool:
        """Continue the run tracking.json names (with `resume`, in the same store), else start a
        new one in `experiment`; True when new."""
        if self.output.mlflow is True:
            self.output.dir.mkdir(parents=True, exist_ok=True)
        self.client = self.mlflow.MlflowClient(self.uri)
        state_file = self.folder / STATE_FILE
        saved = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}
        if saved.get("tracking_uri") == self.uri:
            self.run_id, self.logged = saved["run_id"], saved["round"]
            self.client.update_run(self.run_id, status="RUNNING")
            return False
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None else
                         self.client.create_experiment(experiment, artifact_location=self.artifact_location))
        self.run_id = self.client.create_run(experiment_id, run_name=self.folder.name, tags=tags).info.run_id
        self.logged = -1
        self._save_state()
        return True

    def _save_state(self) -> None:
        path = self.folder / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id, "round": self.logged}))
        os.replace(tmp, path)

    def start(self, config: ExperimentConfig, resume_after: int | None) -> None:
        parent = _parent.get()
        tags = {"mlflow.parentRunId": parent[1]} if parent and parent[0] == self.uri else {}
        if not self.open(config.experiment.name, resume_after is not None, tags):
            return  # a continued run has its params
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
                  for key, value in flat_keys(config.to_json_dict()).items()]
        for first in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + PARAMS_PER_BATCH])

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        step = int(row["round"])
        if step <= self.logged:  # logged before the run was interrupted, and done again since
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in numbers_of(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.logged = step
        self._save_state()

    def artifacts(self) -> list[Path]:
        """What the run keeps: its directory's files and folders, its checkpoints aside."""
        return [p for p in sorted(self.folder.iterdir()) if p.name != "checkpoints" and p.suffix != ".tmp"]

    def stop(self, status: str) -> None:
        try:
            for path in self.artifacts():
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), path.name)
                else:
                    self.client.log_artifact(self.run_id, str(path))
        finally:
            self.client.set_terminated(self.run_id, STATUSES[status])


class ComparisonTracker(MlflowTracker):
    """A comparison's parent run: its tables (cells.csv, summary.csv) as artifacts."""

    def artifacts(self) -> list[Path]:
        return sorted(self.folder.glob("*.csv"))


@contextlib.contextmanager
def comparison_run(folder: Path, config: ExperimentConfig) -> Iterator[None]:
    """While a comparison runs (with output.mlflow set): one parent run, continued when the
    comparison runs again, under which the MLflow run of each cell run inside it nests."""
    if not config.output.mlflow:
        yield
        return
    tracker = ComparisonTracker(config.output, folder)
    trackers = Trackers([tracker])
    trackers.call("open", config.experiment.name, True, {})
    token = _parent.set((tracker.uri, tracker.run_id) if trackers.trackers else None)
    status = "failed"
    try:
        yield
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        _parent.reset(token)
        trackers.stop(status)


class TensorBoardTracker:
    """Event files in `<run dir>/tensorboard`: each round's metrics as scalars at the round as step,
    and a histogram of the clients' accuracies where their rows have one."""

    name = "TensorBoard"

    def __init__(self, run_dir: Path) -> None:
        self.summary_writer = _require("tensorboard").SummaryWriter
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer: Any = None

    def start(self, config: ExperimentConfig, resume_after: int | None) -> None:
        if resume_after is None:  # a new run in an old directory starts without its events
            shutil.rmtree(self.log_dir, ignore_errors=True)
        # purge_step: TensorBoard drops what was written of the rounds a resumed run does again
        self.writer = self.summary_writer(str(self.log_dir),
                                          purge_step=None if resume_after is None else resume_after + 1)

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        step = int(row["round"])
        for key, value in numbers_of(row).items():
            self.writer.add_scalar(key, value, step)
        for key in sorted({k for r in client_rows for k in r if k.endswith("accuracy")}):
            values = [float(r[key]) for r in client_rows
                      if isinstance(r.get(key), numbers.Real) and math.isfinite(r[key])]
            if values:
                self.writer.add_histogram(f"clients/{key}", np.asarray(values), step)
        self.writer.flush()

    def stop(self, status: str) -> None:
        self.writer.close()
