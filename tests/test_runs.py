"""`fedsim run` with each dataset and each kind of heterogeneity (small, in-process runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.config import load_config
from fedsim.runner import run_experiment

SMALL = ["engine.backend=inprocess", "experiment.rounds=2", "strategy.clients_per_round=4",
         "data.num_clients=8", "model.name=logreg", "client.batch_size=32",
         "evaluation.client_fraction=0.5"]
TABULAR = ["data.root={root}", "data.partition.min_size=5"]

CASES = {
    "digits-iid": ["data.partition.kind=iid"],
    "digits-dirichlet": ["data.partition.kind=dirichlet", "data.partition.alpha=0.3"],
    "digits-pathological": ["data.partition.kind=pathological", "data.partition.classes_per_client=2"],
    "digits-shards": ["data.partition.kind=shards"],
    "digits-lognormal-sizes": ["data.partition.kind=iid", "data.partition.sizes=lognormal"],
    "digits-powerlaw-dirichlet": ["data.partition.sizes=powerlaw"],
    "digits-dirichlet-sizes": ["data.partition.kind=iid", "data.partition.sizes=dirichlet"],
    "digits-long-tail": ["data.partition.imbalance=20", "data.partition.min_size=5"],
    "digits-mixed-domains": ["data.features.kind=mixed", "data.features.domains=5"],
    "digits-system": ["system.dropout=0.25", "system.stragglers=0.5", "system.speed_sigma=0.5",
                      "system.deadline=0.5"],
    "synthetic-natural": ["data.dataset=synthetic", "data.partition.kind=natural",
                          "data.synthetic.max_client_size=100"],
    "fashion-mnist-dirichlet": ["data.dataset=fashion-mnist", "data.root={root}"],
    "adult-sensitive": ["data.dataset=adult", "data.partition.kind=sensitive", *TABULAR],
    "adult-heterogeneity": ["data.dataset=adult", "data.partition.kind=heterogeneity",
                            "data.sensitive=race", *TABULAR],
    "german-synergy": ["data.dataset=german", "data.partition.kind=synergy", *TABULAR],
    "german-shift": ["data.dataset=german", "data.partition.kind=iid", "data.features.kind=shift",
                     "data.sensitive=age", *TABULAR],
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_with_each_dataset_and_partition(case, tmp_path, data_dir):
    overrides = [o.format(root=data_dir) for o in CASES[case]]
    config = load_config(None, [*SMALL, *overrides, f"output.run_dir='{tmp_path}'"])
    summary = run_experiment(config)
    rounds = summary.rounds
    assert list(rounds["round"]) == [0, 1, 2]
    assert rounds["test_accuracy"].between(0, 1).all()
    stats = json.loads((tmp_path / "federation.json").read_text())
    assert stats["clients"] == 8 and 0 <= stats["label_tv_distance"] <= 1
    assert (tmp_path / "federation.png").stat().st_size > 1000
    counts = pd.read_parquet(tmp_path / "federation.parquet")
    assert counts["size"].min() >= config.data.partition.min_size or case.startswith("synthetic")
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    if case == "digits-system":
        assert rounds["num_dropped"].iloc[1:].sum() + rounds["num_timed_out"].iloc[1:].sum() > 0
        assert clients["skipped"].notna().any()
        assert np.all(np.diff(rounds["simulated_clock"].iloc[1:]) > 0)
    else:
        assert rounds["num_clients"].iloc[1:].eq(4).all()


def test_partition_command_prints_statistics_and_writes_a_heatmap(tmp_path):
    out = tmp_path / "split.png"
    result = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "partition", "--set", "data.partition.kind=pathological",
         "--set", "data.num_clients=12", "--out", str(out), "--rows", "5", "experiments/quickstart.toml"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "first 5" in text and "classes_per_client" in text and "label_tv_distance" in text
    assert "classes_per_client   2" in text
    assert out.stat().st_size > 1000


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from fedsim import results

    monkeypatch.setattr(results.time, "strftime", lambda _: "20260101-000000")
    config = load_config(None, [f"output.dir={tmp_path}"])
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: results.default_run_dir(config), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() for d in dirs)
    assert sorted(d.name for d in dirs)[0] == f"{config.experiment.name}-20260101-000000-s0"
