"""The long tail: class groups (many / medium / few) of the central evaluation and the balanced
softmax on clients."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from fedsim.api import run
from fedsim.config import ClientSection, load_config
from fedsim.data.federation import build_federation
from fedsim.evaluation import class_group_accuracy, long_tail_groups
from fedsim.method import Batch, ClientContext, TrainPlan
from fedsim.report.runs import collect_runs
from fedsim.report.tables import summary_table
from fedsim.terms import BalancedSoftmax


def test_classes_fall_in_thirds_of_the_training_counts():
    counts = np.array([50, 500, 5, 100, 20, 1000, 10, 200, 2, 300])
    groups = long_tail_groups(counts)
    assert np.flatnonzero(groups == 0).tolist() == [1, 5, 9]  # 500, 1000, 300
    assert np.flatnonzero(groups == 2).tolist() == [2, 6, 8]  # 5, 10, 2
    assert np.flatnonzero(groups == 1).tolist() == [0, 3, 4, 7]
    assert long_tail_groups(np.full(6, 7)).tolist() == [0, 0, 1, 1, 2, 2]  # ties: class order


def test_group_accuracy_counts_each_groups_test_examples():
    groups = np.array([0, 1, 2])
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 1, 0, 0, 2, 2, 2, 0])
    assert class_group_accuracy(predicted, y, groups) == {
        "test_accuracy_many": 0.5, "test_accuracy_medium": pytest.approx(1 / 3), "test_accuracy_few": 0.75}


def test_a_long_tailed_run_reports_groups_that_average_to_the_test_accuracy(tmp_path):
    summary = run("experiments/quickstart.toml", "data.partition.imbalance=10", "experiment.rounds=2",
                  "engine.backend=inprocess", f"output.dir={tmp_path}", "output.save_model=false")
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet")
    federation = pd.read_parquet(summary.run_dir / "federation.parquet")
    counts = federation[[c for c in federation.columns if c.startswith("class_")]].sum().to_numpy()
    groups = long_tail_groups(counts)
    _, y = build_federation(load_config("experiments/quickstart.toml").data, seed=0).test_set()
    shares = np.bincount(groups[y], minlength=3) / len(y)
    parts = rounds[["test_accuracy_many", "test_accuracy_medium", "test_accuracy_few"]].to_numpy()
    np.testing.assert_allclose(parts @ shares, rounds["test_accuracy"], rtol=1e-9)
    assert counts[groups == 0].min() > counts[groups == 2].max()  # the tail is real
    table = summary_table(collect_runs([summary.run_dir]), target=0.5)  # the report's summary
    for group in ("many", "medium", "few"):
        assert table[f"acc. {group} mean"].iloc[0] == rounds[f"test_accuracy_{group}"].iloc[-1]
    plain = run("experiments/quickstart.toml", "experiment.rounds=1", "engine.backend=inprocess",
                f"output.dir={tmp_path}", "output.save_model=false")
    assert "test_accuracy_many" not in pd.read_parquet(plain.run_dir / "rounds.parquet")


def test_the_balanced_softmax_is_the_cross_entropy_of_prior_weighted_probabilities():
    torch.manual_seed(0)
    counts = torch.tensor([30, 6, 0, 4])
    ctx = ClientContext(0, 1, TrainPlan(), {}, {}, None, ClientSection(), 0.1, num_classes=4,
                        labels=torch.repeat_interleave(torch.arange(4), counts))
    logits, targets = torch.randn(5, 4), torch.tensor([0, 1, 3, 0, 1])
    for tau in (1.0, 0.5):
        term = BalancedSoftmax(BalancedSoftmax.Params(tau=tau), ctx)
        total = F.cross_entropy(logits, targets) + term.penalty(None, Batch(logits, logits, targets))
        prior = (counts / counts.sum()).clamp(min=1e-12) ** tau
        weighted = prior * logits.exp()
        expected = -(weighted[torch.arange(5), targets] / weighted.sum(1)).log().mean()
        assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    none = BalancedSoftmax(BalancedSoftmax.Params(tau=0.0), ctx)
    assert none.penalty(None, Batch(logits, logits, targets)).item() == pytest.approx(0.0, abs=1e-7)
