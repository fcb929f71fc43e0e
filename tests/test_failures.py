"""Runs that fail after they started stop with exit code 1 and say why, keeping every finished
round; bad settings a user will hit end in one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import clients.runtime
from fedsim.cli import app
from fedsim.config import load_config
from fedsim.runner import oversubscription

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"


def cli_run(tmp_path: Path, *overrides: str):
    sets = [a for o in ["engine.backend=inprocess", *overrides] for a in ("--set", o)]
    return CliRunner().invoke(app, ["run", str(QUICKSTART), *sets, "--set", f"output.run_dir={tmp_path}"])


def finished_rounds(run_dir: Path) -> list[int]:
    return pd.read_parquet(run_dir / "rounds.parquet")["round"].tolist()


@pytest.fixture
def broken_clients(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(clients.runtime, "train_locally", broken)


def test_consecutive_rounds_without_a_successful_client_stop_the_run(tmp_path, broken_clients):
    out = cli_run(tmp_path, "engine.lockstep=false", "experiment.rounds=5", "engine.max_failed_rounds=2")
    assert out.exit_code == 1
    assert "no client succeeded in 2 consecutive rounds (1-2, engine.max_failed_rounds)" in out.output
    assert "client 0 in round 1: RuntimeError: disk on fire" in out.output
    assert finished_rounds(tmp_path) == [0, 1, 2]  # the finished rounds stay on disk


def test_a_short_run_in_which_every_round_failed_is_a_failure(tmp_path, broken_clients):
    out = cli_run(tmp_path, "engine.lockstep=false", "experiment.rounds=2")  # fewer than 3 rounds
    assert out.exit_code == 1 and "no client succeeded in any of the 2 rounds" in out.output
    assert finished_rounds(tmp_path) == [0, 1, 2]


def test_a_diverged_model_stops_the_run_or_is_dropped(tmp_path):
    out = cli_run(tmp_path / "stop", "client.lr=1e9", "experiment.rounds=3")
    assert out.exit_code == 1 and "diverged at round 1" in out.output
    rounds = pd.read_parquet(tmp_path / "stop" / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1] and rounds["diverged"].iloc[1] == 1
    kept = cli_run(tmp_path / "keep", "client.lr=1e9", "experiment.rounds=2", "engine.on_divergence=keep")
    assert kept.exit_code == 0, kept.output
    rounds = pd.read_parquet(tmp_path / "keep" / "rounds.parquet")
    assert (rounds["diverged"].iloc[1:] == 1).all()
    assert rounds["test_accuracy"].nunique() == 1  # the initial model, kept every round
    with np.load(tmp_path / "keep" / "model.npz") as model:
        assert all(np.isfinite(model[k]).all() for k in model.files)


def test_more_workers_than_cores_warns_with_what_it_costs():
    many = load_config(QUICKSTART, ["engine.workers=64"])
    message = oversubscription(many, cores=2)
    assert "asks for 64 cores but this machine has 2" in message and "set engine.workers = 2" in message
    assert oversubscription(load_config(QUICKSTART), cores=2) == ""
    assert oversubscription(load_config(QUICKSTART, ["engine.workers=64", "engine.backend=inprocess"]),
                            cores=2) == ""


def test_an_unwritable_output_directory_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = cli_run(blocker / "run")
    assert out.exit_code == 2
    assert out.output.strip().splitlines()[-1].startswith(f"error: cannot write the run directory {blocker}")
