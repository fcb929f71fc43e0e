"""Experiment tracking: runs, comparisons and resumed runs in MLflow (its embedded SQLite store)
and TensorBoard event files, read back and checked against the run directory's tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.compare import load_comparison, run_comparison
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.resume import differences
from fedsim.runner import run_experiment
from fedsim.tracking import mlflow_store
from fedsim.warmup import warmup_config

mlflow = pytest.importorskip("mlflow")  # the tracking extra
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SMALL = ["engine.backend=inprocess", "experiment.rounds=3", "strategy.clients_per_round=4",
         "data.num_clients=8", "model.name=logreg", "evaluation.client_fraction=0.5",
         "experiment.name=tracked"]
WALL_CLOCK = ["seconds", "train_seconds"]
QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"


def store_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def runs_of(out: Path, monkeypatch) -> pd.DataFrame:
    """The MLflow runs of experiment "tracked" in the embedded store of output.dir `out`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(out))
    return mlflow.search_runs(experiment_names=["tracked"], output_format="pandas")


def metric_columns(rounds: pd.DataFrame) -> list[str]:
    return [c for c in rounds.columns if c != "round" and pd.api.types.is_numeric_dtype(rounds[c])]


def assert_history_is_the_table(client, run_id: str, rounds: pd.DataFrame, skip=()) -> None:
    """One MLflow value per round of each metric, equal to the rounds table's."""
    columns = [c for c in metric_columns(rounds) if c not in skip]
    assert {"test_accuracy", "train_loss", "client_eval_accuracy"} <= set(columns)
    for column in columns:
        expected = rounds.dropna(subset=[column])
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, column))
        assert [step for step, _ in history] == expected["round"].tolist(), column
        assert [value for _, value in history] == expected[column].tolist(), column


def scalars(log_dir: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One small run with MLflow (the embedded store in output.dir) and TensorBoard, started from
    an empty working directory."""
    root = tmp_path_factory.mktemp("tracked")
    (root / "cwd").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSIM_CACHE_DIR", str(root / "cache"))
        patch.chdir(root / "cwd")
        config = load_config(None, [*SMALL, f"output.dir={root / 'runs'}",
                                    f"output.run_dir={root / 'runs' / 'run'}",
                                    "output.mlflow=true", "output.tensorboard=true"])
        summary = run_experiment(config)
    return root, summary


def test_an_mlflow_run_holds_params_every_rounds_metrics_and_the_run_directory(tracked_run, monkeypatch):
    root, summary = tracked_run
    out = root / "runs"
    assert not list((root / "cwd").iterdir())  # no store or artifacts in the working directory
    runs = runs_of(out, monkeypatch)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "run"
    assert run["params.experiment.rounds"] == "3" and run["params.client.lr"] == "0.05"
    assert run["params.data.partition.kind"] == "dirichlet" and run["params.model.hidden"] == "[128]"
    assert run["params.output.mlflow"] == "True"
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1, 2, 3]
    assert run["metrics.test_accuracy"] == rounds["test_accuracy"].iloc[-1]
    client = mlflow.MlflowClient(store_uri(out))
    assert_history_is_the_table(client, run["run_id"], rounds)
    assert json.loads((summary.run_dir / "tracking.json").read_text())["run_id"] == run["run_id"]

    names = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"rounds.parquet", "clients.parquet", "config.json", "summary.json", "log.txt",
            "model.npz", "tensorboard"} <= names
    assert run["artifact_uri"].startswith((out / "mlartifacts").resolve().as_uri())
    copy = client.download_artifacts(run["run_id"], "rounds.parquet", str(root / "download"))
    pd.testing.assert_frame_equal(pd.read_parquet(copy), rounds)


def test_tensorboard_has_every_rounds_scalars_and_the_clients_accuracy_histogram(tracked_run):
    root, summary = tracked_run
    events = scalars(summary.run_dir / "tensorboard")
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet")
    for column in metric_columns(rounds):
        expected = rounds.dropna(subset=[column])
        logged = events.Scalars(column)
        assert [e.step for e in logged] == expected["round"].tolist(), column
        np.testing.assert_array_equal([e.value for e in logged],
                                      expected[column].to_numpy(np.float32), err_msg=column)
    clients = pd.read_parquet(summary.run_dir / "clients.parquet").dropna(subset=["eval_accuracy"])
    histograms = events.Histograms("clients/eval_accuracy")
    assert [h.step for h in histograms] == [1, 2, 3]
    for h in histograms:
        accuracy = clients.loc[clients["round"] == h.step, "eval_accuracy"]
        assert h.histogram_value.num == len(accuracy) == 4
        assert h.histogram_value.min == accuracy.min() and h.histogram_value.max == accuracy.max()
        assert h.histogram_value.sum == pytest.approx(accuracy.sum())


SPEC = """
[experiment]
name = "tracked"
rounds = 2
[data]
num_clients = 6
[model]
name = "logreg"
[strategy]
clients_per_round = 3
[evaluation]
client_fraction = 0.0
[engine]
backend = "inprocess"
[output]
dir = "{out}"
save_model = false
mlflow = true
[compare]
name = "grid"
[compare.grid]
"experiment.seed" = [0, 1]
"""


def test_a_comparison_is_one_parent_run_with_a_child_run_per_cell(tmp_path, monkeypatch):
    spec = tmp_path / "grid.toml"
    spec.write_text(SPEC.format(out=tmp_path / "runs"))
    folder, cells = load_comparison(spec)
    run_comparison(folder, cells, lambda cell: run_experiment(cell.config), lambda cell, status: None)
    runs = runs_of(tmp_path / "runs", monkeypatch)
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert parents["tags.mlflow.runName"].tolist() == ["grid"] and parents["status"].tolist() == ["FINISHED"]
    parent = parents["run_id"].iloc[0]
    assert (children["tags.mlflow.parentRunId"] == parent).all()
    assert sorted(children["tags.mlflow.runName"]) == ["seed=0", "seed=1"]
    assert sorted(children["params.experiment.seed"]) == ["0", "1"]
    assert (children["status"] == "FINISHED").all()
    for cell in cells:
        child = children[children["tags.mlflow.runName"] == cell.name].iloc[0]
        summary = json.loads((cell.run_dir / "summary.json").read_text())
        assert child["metrics.test_accuracy"] == summary["final_accuracy"]
    client = mlflow.MlflowClient(store_uri(tmp_path / "runs"))
    assert {a.path for a in client.list_artifacts(parent)} == {"cells.csv", "summary.csv"}

    run_comparison(folder, cells, lambda cell: pytest.fail("finished"), lambda cell, status: None)
    again = runs_of(tmp_path / "runs", monkeypatch)  # the comparison run again continues its parent run
    assert sorted(again["run_id"]) == sorted(runs["run_id"])


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_log(tmp_path, monkeypatch):
    config = load_config(None, [*SMALL, "experiment.rounds=6", "output.checkpoint_every=2",
                                f"output.dir={tmp_path}", f"output.run_dir={tmp_path / 'run'}",
                                "output.mlflow=true", "output.tensorboard=true"])

    def interrupt_after_round_5(server_round: int, row: dict) -> None:
        if server_round == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # its last checkpoint is round 4: round 5 is done again
        run_experiment(config, progress=interrupt_after_round_5)
    stopped = runs_of(tmp_path, monkeypatch)
    assert stopped["status"].tolist() == ["KILLED"] and stopped["metrics.test_accuracy"].notna().all()
    client = mlflow.MlflowClient(store_uri(tmp_path))
    run_id = stopped["run_id"].iloc[0]
    assert "rounds.parquet" in {a.path for a in client.list_artifacts(run_id)}  # as far as it got

    run_experiment(config, resume=True)
    resumed = runs_of(tmp_path, monkeypatch)
    assert resumed["run_id"].tolist() == [run_id] and resumed["status"].tolist() == ["FINISHED"]
    rounds = pd.read_parquet(tmp_path / "run" / "rounds.parquet")
    assert rounds["round"].tolist() == list(range(7))
    # round 5 is not logged twice; its wall-clock times are those of the first attempt
    assert_history_is_the_table(client, run_id, rounds, skip=WALL_CLOCK)
    for column in WALL_CLOCK:
        assert [m.step for m in client.get_metric_history(run_id, column)] == list(range(1, 7))

    events = scalars(tmp_path / "run" / "tensorboard")  # the redone round 5 replaces the first one
    for column in metric_columns(rounds):
        expected = rounds.dropna(subset=[column])
        logged = events.Scalars(column)
        assert [e.step for e in logged] == expected["round"].tolist(), column
        np.testing.assert_array_equal([e.value for e in logged], expected[column].to_numpy(np.float32))


def test_a_failing_tracker_is_warned_once_and_the_run_goes_on(tmp_path, monkeypatch):
    real_log_batch = mlflow.MlflowClient.log_batch

    def read_only_store(self, run_id, metrics=(), **kwargs):
        if metrics:
            raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) attempt to write a "
                                                    "readonly database\n[SQL: INSERT INTO metrics ...]")
        return real_log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", read_only_store)
    config = load_config(None, [*SMALL, f"output.dir={tmp_path}", f"output.run_dir={tmp_path / 'run'}",
                                "output.mlflow=true", "output.tensorboard=true"])
    summary = run_experiment(config)
    assert summary.rounds["round"].tolist() == [0, 1, 2, 3]
    warnings = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "MLflow tracking failed (MlflowException: (sqlite3.OperationalError) attempt to write a " \
           "readonly database); the run goes on without it" in warnings[0]
    assert [e.step for e in scalars(tmp_path / "run" / "tensorboard").Scalars("train_loss")] == [1, 2, 3]


@pytest.mark.parametrize("key, module", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_tracker_that_is_not_installed_is_one_clear_error_before_anything_runs(tmp_path, monkeypatch,
                                                                                   key, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    sets = [*SMALL, f"output.dir={tmp_path}", f"output.{key}=true"]
    with pytest.raises(ConfigError, match=rf'output.{key} is set but {key} cannot be imported .*'
                                          r'pip install -e "\.\[tracking\]"'):
        run_experiment(load_config(None, sets))
    assert not list(tmp_path.iterdir())  # nothing was written
    out = CliRunner().invoke(app, ["run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)]])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.output.strip().splitlines()[-1].startswith(f"error: output.{key} is set but")
    spec = tmp_path / "grid.toml"
    spec.write_text(SPEC.replace("mlflow = true", f"{key} = true").format(out=tmp_path / "runs"))
    with pytest.raises(ConfigError, match=rf"cell seed=0: output.{key} is set"):
        load_comparison(spec)


def test_tracking_keys_store_and_what_they_leave_alone(tmp_path):
    on = load_config(None, [f"output.dir={tmp_path}", "output.mlflow=true"]).output
    assert mlflow_store(on) == (f"sqlite:///{tmp_path.resolve()}/mlflow.db",
                                (tmp_path / "mlartifacts").resolve().as_uri())
    server = load_config(None, ["output.mlflow=http://127.0.0.1:5000"]).output
    assert mlflow_store(server) == ("http://127.0.0.1:5000", None)
    off = load_config(None, []).output
    assert off.mlflow is False and off.tensorboard is False
    with pytest.raises(ConfigError, match="output.tensorboard"):
        load_config(None, ["output.tensorboard=maybe"])
    # where results go, not what the run computes: a run resumes with tracking switched on
    assert differences({"output": {"mlflow": False, "tensorboard": False}},
                       {"output": {"mlflow": True, "tensorboard": True}}) == []
    tracked = load_config(None, ["data.embedding=warmup", "output.mlflow=true", "output.tensorboard=true"])
    assert not warmup_config(tracked).output.mlflow and not warmup_config(tracked).output.tensorboard
