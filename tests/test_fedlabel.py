"""Clients with few labels (`data.labels`) and the FedLabel add-on."""

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.data.federation import build_federation
from fedsim.errors import ConfigError, DataError


def _federation(*overrides):
    return build_federation(load_config(None, ["data.num_clients=5", *overrides]).data, seed=0)


def test_labels_hide_a_stratified_share_and_keep_every_row():
    full = _federation()
    fed = _federation("data.labels.fraction=0.1")
    y = fed.dataset.y_train
    for k in range(fed.num_clients):
        labelled, hidden = fed.train_idx[k], fed.unlabeled_idx[k]
        assert not np.intersect1d(labelled, hidden).size
        np.testing.assert_array_equal(np.sort(np.concatenate([labelled, hidden])), full.train_idx[k])
        for c in np.unique(y[full.train_idx[k]]):  # every class keeps round(10%), at least one
            total = int((y[full.train_idx[k]] == c).sum())
            kept = int((y[labelled] == c).sum())
            assert kept == max(1, total - min(int(round(0.9 * total)), total - 1))
        np.testing.assert_array_equal(fed.hidden_labels(k), y[hidden])
    assert fed.train_sizes.sum() < 0.2 * full.train_sizes.sum()


def test_unlabelled_inputs_carry_no_labels_to_the_client():
    fed = _federation("data.labels.fraction=0.2")
    data = fed.client_data(0)
    assert len(data.y_train) == len(data.x_train) == len(fed.train_idx[0])
    assert len(data.x_unlabeled) == len(fed.unlabeled_idx[0])
    np.testing.assert_array_equal(data.x_unlabeled, fed.dataset.x_train[fed.unlabeled_idx[0]])
    assert not hasattr(data, "y_unlabeled")


def test_drawn_and_unstratified_shares():
    fed = _federation("data.labels.fraction=0.05", "data.labels.fraction_max=0.5",
                      "data.labels.stratified=false")
    sizes = np.array([len(t) + len(u) for t, u in zip(fed.train_idx, fed.unlabeled_idx, strict=True)])
    shares = fed.train_sizes / sizes
    assert ((shares >= 0.05 - 1 / sizes) & (shares <= 0.5 + 1 / sizes)).all()
    assert shares.std() > 0.02  # drawn per client, not one share
    assert _federation().unlabeled_idx is None


def test_bad_label_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="fraction_max"):
        load_config(None, ["data.labels.fraction=0.5", "data.labels.fraction_max=0.2"])
    with pytest.raises(ConfigError, match="data.labels.fraction"):
        load_config(None, ["data.labels.fraction=0"])
    spec = load_config(None, ["data.dataset=synthetic", "data.partition.kind=natural",
                              "data.labels.fraction=0.5"])
    with pytest.raises(DataError, match="data.labels"):
        build_federation(spec.data, seed=0)


# ---- the method -------------------------------------------------------------------------------

import dataclasses  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from clients import runtime  # noqa: E402
from clients.runtime import score_pseudo_labels  # noqa: E402
from fedsim.api import run  # noqa: E402
from fedsim.config import ClientSection, FedLabelSection  # noqa: E402
from fedsim.data import federation as federation_module  # noqa: E402
from fedsim.method import Batch, ClientContext, ClientResult, RoundResult, TrainPlan  # noqa: E402
from strategies.fedlabel import FedLabel, PseudoLabelLoss, pseudo_labels  # noqa: E402


def test_the_more_confident_model_labels_each_example():
    p_global = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    p_local = torch.tensor([[0.3, 0.7], [0.1, 0.9], [0.4, 0.6]])
    labels, confidence, local = pseudo_labels(p_global, p_local, "select")
    assert labels.tolist() == [0, 1, 1] and local.tolist() == [False, True, False]
    assert confidence.tolist() == pytest.approx([0.9, 0.9, 0.8])
    assert pseudo_labels(p_global, p_local, "global")[0].tolist() == [0, 0, 1]
    assert pseudo_labels(p_global, p_local, "local")[0].tolist() == [1, 1, 1]
    assert pseudo_labels(p_global, None, "select")[2].tolist() == [False] * 3  # no local model yet


def _teacher(seed):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    model.eval()
    return model


def test_the_unlabelled_loss_equals_the_hand_computed_one():
    torch.manual_seed(0)
    unlabeled = torch.randn(40, 4) * 3
    params = FedLabelSection(enabled=True, threshold=0.6, unlabeled_ratio=2, consistency=0.5,
                             unlabeled_weight=1.5, weak=[], strong=["noise"], noise_std=0.2)
    ctx = ClientContext(3, 2, TrainPlan(), {}, {}, None, ClientSection(), 0.1, unlabeled=unlabeled)
    global_teacher, local_teacher, student = _teacher(1), _teacher(2), _teacher(3)
    term = PseudoLabelLoss(params, ctx, global_teacher, local_teacher)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = term.penalty(student, Batch(x, student(x), y))

    rows = term.rows[0]
    assert len(rows) == 10 and len(set(rows.tolist())) == 10  # mu * B rows of one reshuffled pass
    u = unlabeled[rows]
    generator = torch.Generator().manual_seed(0)  # recompute the strong view's noise
    generator.manual_seed(term.generator.initial_seed())
    torch.randperm(40, generator=generator)
    strong = u + 0.4 * torch.randn(u.shape, generator=generator)
    p_g, p_l = torch.softmax(global_teacher(u), 1), torch.softmax(local_teacher(u), 1)
    expected = 0.0
    for i in range(10):
        use_local = p_l[i].max() > p_g[i].max()
        p = p_l[i] if use_local else p_g[i]
        if p.max() >= 0.6:
            expected += 1.5 * F.cross_entropy(student(strong[i:i + 1]), p.argmax().view(1)).item() / 10
            assert term.labels[0][i].item() == p.argmax().item()
        else:
            assert term.labels[0][i].item() == -1
        if p_l[i].argmax() == p_g[i].argmax():
            q = torch.log_softmax(student(u[i:i + 1]), 1)[0]
            expected += 0.5 * (p_l[i] * (p_l[i].log() - q)).sum().item() / 10
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the teachers stay frozen: only the trained model gets gradients
    assert student.weight.grad is not None and global_teacher.weight.grad is None


def test_pseudo_labels_are_scored_against_the_hidden_labels_and_pooled_per_round():
    fed = _federation("data.labels.fraction=0.2")
    truth = fed.hidden_labels(1)
    rows = np.array([0, 1, 2, 3, 1])
    labels = np.array([truth[0], (truth[1] + 1) % 10, -1, truth[3], truth[1]])
    assert score_pseudo_labels(fed, 1, rows, labels) == {"pseudo_correct": 3.0}
    assert score_pseudo_labels(object(), 1, rows, labels) == {}  # a deployed node: unknown
    add_on = FedLabel({"enabled": True})
    clients = [ClientResult(0, {"pseudo_drawn": 10, "pseudo_labelled": 4, "pseudo_correct": 3,
                                "pseudo_from_local": 1}),
               ClientResult(1, {"pseudo_drawn": 30, "pseudo_labelled": 16, "pseudo_correct": 8,
                                "pseudo_from_local": 9})]
    metrics = add_on.on_round(1, {}, RoundResult(clients=clients))
    assert metrics == {"pseudo_label_accuracy": 11 / 20, "pseudo_label_coverage": 20 / 40,
                       "pseudo_local_share": 10 / 20}


def test_fedlabel_needs_unlabelled_data():
    from fedsim.registry import check_config

    with pytest.raises(ConfigError, match="data.labels.fraction"):
        check_config(load_config(None, ["fedlabel.enabled=true"]))


def _scrambled_hidden_labels(monkeypatch):
    """Build federations whose hidden labels are all wrong (shifted by one class)."""
    build = federation_module._build

    def scrambled(spec, seed):
        fed = build(spec, seed)
        y = fed.dataset.y_train.copy()
        for rows in fed.unlabeled_idx:
            y[rows] = (y[rows] + 1) % fed.num_classes
        fed.dataset = dataclasses.replace(fed.dataset, y_train=y)
        return fed

    federation_module._cached.cache_clear()
    runtime._RESIDENT.clear()  # the workers' cached data
    monkeypatch.setattr(federation_module, "_build", scrambled)


@pytest.mark.parametrize("teacher", ["select", "global"])
def test_training_never_reads_the_hidden_labels(tmp_path, monkeypatch, teacher):
    """The same run with every hidden label changed trains the same model; only the pseudo-label
    accuracy (which the simulator scores) sees the change."""
    spec = ["data.num_clients=4", "data.labels.fraction=0.2", "model.name=logreg", "experiment.rounds=3",
            "strategy.clients_per_round=4", "engine.backend=inprocess", "fedlabel.enabled=true",
            f"fedlabel.teacher={teacher}", "fedlabel.threshold=0.15", "client.lr=0.5", "fedlabel.weak=[]",
            "fedlabel.strong=['cutout']", "client.local_steps=5", "output.save_model=false"]
    plain = run({}, *spec, f"output.dir={tmp_path / 'plain'}")
    _scrambled_hidden_labels(monkeypatch)
    scrambled = run({}, *spec, f"output.dir={tmp_path / 'scrambled'}")
    federation_module._cached.cache_clear()
    runtime._RESIDENT.clear()
    a, b = (pd.read_parquet(s.run_dir / "rounds.parquet") for s in (plain, scrambled))
    for column in ("train_loss", "pseudo_label_coverage", "pseudo_local_share"):
        pd.testing.assert_series_equal(a[column], b[column])
    assert a["test_accuracy"].iloc[-1] == b["test_accuracy"].iloc[-1]
    assert a["pseudo_label_coverage"].iloc[-1] > 0.1
    assert (b["pseudo_label_accuracy"].iloc[1:] != a["pseudo_label_accuracy"].iloc[1:]).all()
    assert a["pseudo_label_accuracy"].iloc[-1] > 0.4 > b["pseudo_label_accuracy"].iloc[-1]
    if teacher == "global":
        assert (a["pseudo_local_share"].dropna() == 0).all()
    else:  # from round 2 on, clients have a local model, which labels some examples
        assert a["pseudo_local_share"].iloc[2:].gt(0).all()


def test_the_report_plots_accuracy_against_labels_and_the_pseudo_labels(tmp_path):
    from fedsim.report import build_report
    from fedsim.report.plots import labelled_fraction

    common = ["data.num_clients=4", "model.name=logreg", "experiment.rounds=2", "engine.backend=inprocess",
              "strategy.clients_per_round=4", "output.save_model=false", "client.local_steps=3"]
    few = run({}, *common, "data.labels.fraction=0.2", "fedlabel.enabled=true", "fedlabel.weak=[]",
              "fedlabel.strong=[]", f"output.dir={tmp_path / 'few'}")
    full = run({}, *common, f"output.dir={tmp_path / 'full'}")
    page = build_report([few.run_dir, full.run_dir], tmp_path / "report.html").read_text()
    assert "Accuracy and labels" in page and "Pseudo-labels per round" in page
    assert "20%" in page and "100%" in page  # the labelled shares on the axis
    from fedsim.report.runs import collect_runs
    assert sorted(labelled_fraction(r) for r in collect_runs([few.run_dir, full.run_dir])) == [0.2, 1.0]
