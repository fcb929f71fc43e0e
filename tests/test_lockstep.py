"""Lockstep training of many small clients equals training them one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.lockstep import lockstep_possible, lockstep_proximal_mu, train_in_lockstep
from clients.training import train_locally
from clients.vectorized import batch_plan
from fedsim.config import ClientSection, load_config
from fedsim.data.tensors import LocalData
from fedsim.method import ClientContext, TrainPlan
from fedsim.models import build_model
from fedsim.runner import run_experiment
from fedsim.terms import ParityPenalty, Proximal
from strategies.fedprox import FedProx


def clients(sizes, dim=7, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = torch.as_tensor(rng.normal(size=(n, dim)), dtype=torch.float32)
        y = torch.as_tensor(rng.integers(0, classes, n))
        out.append(LocalData(x, y, x[:0], y[:0]))
    return out


@pytest.mark.parametrize("model,optimizer,momentum,decay,mu", [
    ("logreg", "sgd", 0.0, 0.0, 0.0), ("logreg", "sgd", 0.9, 5e-4, 0.0), ("logreg", "sgd", 0.5, 0.0, 0.3),
    ("mlp", "sgd", 0.0, 0.0, 0.0), ("mlp", "sgd", 0.9, 5e-4, 0.2),
    ("logreg", "adam", 0.0, 0.0, 0.0), ("mlp", "adam", 0.0, 5e-4, 0.1)])
def test_lockstep_equals_one_by_one(model, optimizer, momentum, decay, mu):
    settings = ClientSection(batch_size=4, local_epochs=2, optimizer=optimizer, momentum=momentum,
                             weight_decay=decay)
    data = clients([9, 4, 13, 1, 6])  # partial last batches, a single-row client
    spec = load_config(None, [f"model.name={model}", "model.hidden=[8, 5]"]).model
    net = build_model(spec, (7,), 4, seed=3)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    names = [name for name, _ in net.named_parameters()]
    seeds, lr, steps = [11, 12, 13, 14, 15], 0.05 if optimizer == "adam" else 0.1, [None, 3, None, None, 1]
    mus = [mu, 0.0, mu, mu, 2 * mu]
    together = train_in_lockstep([start[n] for n in names], data, seeds, lr, steps, settings, mus)
    for i, local in enumerate(data):
        net.load_state_dict(start)
        terms = [Proximal(Proximal.Params(mu=mus[i]), context(start))] if mus[i] else []
        metrics = train_locally(net, local, settings, terms, seeds[i], lr, steps=steps[i])
        params, lock_metrics = together[i]
        for name, value in zip(names, params, strict=True):
            torch.testing.assert_close(value, net.state_dict()[name], atol=2e-6, rtol=0)
        assert lock_metrics["steps"] == metrics["steps"]
        assert lock_metrics["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-6)


def test_batch_plan_covers_each_pass_once():
    index, mask = batch_plan(n=10, steps=6, batch_size=4, seed=1)  # 3 batches per pass
    for first in (0, 3):
        rows = index[first:first + 3][mask[first:first + 3].bool()]
        assert sorted(rows.tolist()) == list(range(10))
    assert mask.sum(dim=1).tolist() == [4, 4, 2, 4, 4, 2]


def context(global_arrays=None) -> ClientContext:
    return ClientContext(0, 1, TrainPlan(), global_arrays or {}, {}, None, ClientSection(), 0.1)


def test_only_linear_relu_models_without_augmentation_and_with_proximal_terms_qualify():
    assert lockstep_possible(load_config(None, ["model.name=logreg"]))
    assert lockstep_possible(load_config(None, ["model.name=mlp"]))
    assert not lockstep_possible(load_config(None, ["model.name=cnn"]))
    assert lockstep_possible(load_config(None, ["model.name=mlp", "client.optimizer=adam"]))
    assert not lockstep_possible(load_config(None, ["model.name=mlp", "client.augment=['flip']"]))
    plans, none = [TrainPlan(), TrainPlan(local_steps=3)], [[], []]
    prox = [[], FedProx({"mu": 0.1}).loss_terms(context())]
    assert lockstep_proximal_mu(plans, none) == [0.0, 0.0]
    assert lockstep_proximal_mu(plans, prox) == [0.0, 0.1]
    assert lockstep_proximal_mu(plans, [prox[1], prox[1] * 2]) == [0.1, pytest.approx(0.2)]
    parity = [[], [ParityPenalty(ParityPenalty.Params(), context())]]
    assert lockstep_proximal_mu(plans, parity) is None  # another loss term


# Adam turns float32 noise on near-zero gradients into steps of up to lr (0.01 here): single
# weights agree to that, the accuracy exactly
@pytest.mark.parametrize(("optimizer", "weight_tol"), [(["client.momentum=0.5"], 1e-5),
                                                       (["client.optimizer=adam", "client.lr=0.01"], 0.01)])
def test_simulation_with_and_without_lockstep_agree(tmp_path, monkeypatch, optimizer, weight_tol):
    import clients.runtime

    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return train_in_lockstep(*args, **kwargs)

    monkeypatch.setattr(clients.runtime, "train_in_lockstep", counted)
    base = ["data.dataset=synthetic", "data.partition.kind=natural", "data.num_clients=30",
            "model.name=mlp", "strategy.clients_per_round=10", "experiment.rounds=3",
            "engine.backend=inprocess", "engine.workers=1", *optimizer,
            "strategy.name=fedprox", "strategy.mu=0.1",
            f"output.dir={tmp_path}"]
    runs = [run_experiment(load_config(None, [*base, f"engine.lockstep={on}"])) for on in ("true", "false")]
    assert calls == [10, 10, 10]  # every round's clients trained together, once
    with np.load(runs[0].run_dir / "model.npz") as a, np.load(runs[1].run_dir / "model.npz") as b:
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], atol=weight_tol)
    np.testing.assert_allclose(runs[0].rounds["test_accuracy"], runs[1].rounds["test_accuracy"], atol=1e-6)
