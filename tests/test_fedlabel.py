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
from fedsim.method import ClientContext, ClientResult, RoundResult, TrainPlan  # noqa: E402
from strategies.fedlabel import FedLabel, UnlabelledTraining, choose_experts  # noqa: E402


def test_the_more_confident_model_is_the_expert_for_each_example():
    p_global = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]])
    p_local = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.45, 0.45, 0.1]])
    variance = lambda p: ((p - p.mean(1, keepdim=True)) ** 2).mean(1)  # noqa: E731
    use_local, expert, other, ratio = choose_experts(p_global, p_local, "select", "variance")
    # row 2: the maxima prefer the global model (0.45 > 0.4) but the variances the local one
    assert use_local.tolist() == [False, True, True]
    torch.testing.assert_close(expert, torch.stack([p_global[0], p_local[1], p_local[2]]))
    torch.testing.assert_close(other, torch.stack([p_local[0], p_global[1], p_global[2]]))
    h_g, h_l = variance(p_global), variance(p_local)
    torch.testing.assert_close(ratio, torch.stack([h_l[0] / h_g[0], h_g[1] / h_l[1], h_g[2] / h_l[2]]))
    assert (ratio <= 1).all()  # the other model is never more confident than the expert
    assert choose_experts(p_global, p_local, "select", "max")[0].tolist() == [False, True, True]
    assert choose_experts(p_global[2:], p_local[2:], "select", "max")[0].tolist() == [True]
    assert choose_experts(p_global, p_local, "global", "variance")[0].tolist() == [False] * 3
    assert choose_experts(p_global, p_local, "local", "variance")[0].tolist() == [True] * 3


def _teacher(seed):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    model.eval()
    return model


def _context(unlabeled, **client):
    return ClientContext(3, 2, TrainPlan(), {}, {}, None, ClientSection(**client), 0.1, unlabeled=unlabeled)


def test_the_unlabelled_loss_equals_the_hand_computed_one():
    torch.manual_seed(0)
    unlabeled = torch.randn(40, 4) * 3
    params = FedLabelSection(enabled=True, threshold=0.6, unlabeled_ratio=2, consistency=0.5,
                             unlabeled_weight=1.5, weak=[], strong=["noise"], noise_std=0.2)
    global_teacher, local_teacher, student = _teacher(1), _teacher(2), _teacher(3)
    training = UnlabelledTraining(params, _context(unlabeled), global_teacher, local_teacher)
    rows = training.next_rows(10)
    assert len(set(rows.tolist())) == 10  # one reshuffled pass
    loss = training.loss(student, rows)

    generator = torch.Generator().manual_seed(training.generator.initial_seed())
    torch.randperm(40, generator=generator)  # recompute the strong view's noise
    u = unlabeled[rows]
    strong = u + 0.4 * torch.randn(u.shape, generator=generator)
    p_g, p_l = torch.softmax(global_teacher(u), 1), torch.softmax(local_teacher(u), 1)
    expected, kept = 0.0, 0
    for i in range(10):
        h_g, h_l = p_g[i].var(unbiased=False), p_l[i].var(unbiased=False)
        expert, other = (p_l[i], p_g[i]) if h_l > h_g else (p_g[i], p_l[i])
        label = expert.argmax()
        if expert.max() < 0.6:
            assert training.labels[0][i].item() == -1
            continue
        kept += 1
        assert training.labels[0][i].item() == label.item()
        expected += 1.5 * F.cross_entropy(student(strong[i:i + 1]), label.view(1)).item() / 10
        if other.argmax() == label:
            q = torch.softmax(student(u[i:i + 1]), 1)[0]
            weight = float(min(h_g, h_l) / max(h_g, h_l))
            expected += 0.5 * weight * (q * (q.log() - other.log())).sum().item() / 10
    assert 0 < kept < 10
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the teachers stay frozen: only the trained model gets gradients
    assert student.weight.grad is not None and global_teacher.weight.grad is None


def _after_training(params, local_expert, unlabeled):
    """FedLabel's client half on a logistic-regression client whose local expert is given."""
    global_model = _teacher(1)
    ctx = _context(unlabeled, batch_size=4)
    ctx.global_arrays = {k: v.clone() for k, v in global_model.state_dict().items()}
    ctx.model_factory, ctx.steps, ctx.num_examples = lambda: nn.Linear(4, 3), 6, 9
    return FedLabel(params).after_training(ctx, local_expert), ctx


def test_a_client_sends_the_sum_of_the_local_expert_and_the_unlabelled_update():
    torch.manual_seed(0)
    unlabeled = torch.randn(30, 4) * 3
    params = FedLabelSection(enabled=True, threshold=0.4, unlabeled_ratio=2, weak=[], strong=["noise"])
    expert = _teacher(2)
    expected_expert = {k: v.clone() for k, v in expert.state_dict().items()}
    update, ctx = _after_training(params, expert, unlabeled)

    student = _teacher(1)  # the unlabelled model, trained again from the global model
    global_teacher, local_teacher = _teacher(1), _teacher(2)
    UnlabelledTraining(params, ctx, global_teacher, local_teacher).train(student, 6, 4)
    for name, w in ctx.global_arrays.items():
        delta_l, delta_u = expected_expert[name] - w, student.state_dict()[name] - w
        assert delta_u.abs().max() > 1e-3
        # the model left in place is what the worker sends, and what later add-ons see
        sent = expert.state_dict()[name].numpy()
        np.testing.assert_allclose(sent, (w + delta_l + delta_u).numpy(), atol=1e-6)
        torch.testing.assert_close(expert.state_dict()[name], w + delta_l + delta_u)
    assert "model" not in update.outputs
    assert update.metrics["pseudo_drawn"] == 6 * 2 * 4
    assert 0 < update.metrics["pseudo_kept_examples"] <= 30
    assert update.metrics["num_examples"] == 9 + update.metrics["pseudo_kept_examples"]


def test_without_unlabelled_loss_a_client_sends_its_local_expert():
    unlabeled = torch.randn(30, 4)
    expert = _teacher(2)
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    for params in (FedLabelSection(enabled=True, threshold=1.0, weak=[], strong=[]),  # nothing kept
                   FedLabelSection(enabled=True, unlabeled_weight=0, consistency=0, weak=[], strong=[])):
        update, _ = _after_training(params, expert, unlabeled)
        assert "model" not in update.outputs  # the worker sends the model as left in place
        for name, value in before.items():
            np.testing.assert_allclose(expert.state_dict()[name].numpy(), value.numpy(), atol=1e-7)


def test_fedlabel_refuses_strategies_that_send_more_than_the_model():
    from fedsim.registry import check_config

    with pytest.raises(ConfigError, match="fedlabel: strategy 'scaffold'"):
        check_config(load_config(None, ["fedlabel.enabled=true", "data.labels.fraction=0.2",
                                        "strategy.name=scaffold"]))


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


@pytest.mark.parametrize("teacher", ["select", "local"])
def test_training_never_reads_the_hidden_labels(tmp_path, monkeypatch, teacher):
    """The same run with every hidden label changed trains the same model; only the pseudo-label
    accuracy (which the simulator scores) sees the change."""
    spec = ["data.num_clients=4", "data.labels.fraction=0.2", "model.name=logreg", "experiment.rounds=3",
            "strategy.clients_per_round=4", "engine.backend=inprocess", "fedlabel.enabled=true",
            f"fedlabel.teacher={teacher}", "fedlabel.threshold=0.3", "client.lr=0.5", "fedlabel.weak=[]",
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
    share = a["pseudo_local_share"].dropna()  # the local expert labels from the first round on
    assert len(share) == 3 and ((share == 1).all() if teacher == "local" else share.between(0.5, 1).all())


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


def test_the_local_expert_trains_alike_in_lockstep_and_one_by_one(tmp_path, monkeypatch):
    """FedLabel adds no term to the labelled training, so it keeps the fast paths; the runs agree."""
    calls = []
    kernel = runtime.train_in_lockstep
    monkeypatch.setattr(runtime, "train_in_lockstep", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    spec = ["data.num_clients=4", "data.labels.fraction=0.2", "model.name=mlp", "model.hidden=[16]",
            "experiment.rounds=2", "strategy.clients_per_round=4", "engine.backend=inprocess",
            "fedlabel.enabled=true", "fedlabel.threshold=0.2", "fedlabel.weak=[]", "fedlabel.strong=[]",
            "client.local_steps=4", "client.lr=0.5", "output.save_model=false"]
    tables = [pd.read_parquet(run({}, *spec, f"engine.lockstep={on}", f"output.dir={tmp_path / on}").run_dir
                              / "rounds.parquet") for on in ("true", "false")]
    for column in ("train_loss", "test_loss", "pseudo_label_coverage", "pseudo_local_share"):
        np.testing.assert_allclose(tables[0][column], tables[1][column], rtol=1e-5, atol=1e-6)
    assert tables[0]["pseudo_label_coverage"].iloc[-1] > 0
    assert len(calls) == 4  # lockstep: 2 rounds x 2 workers
