"""FedNova and MOON, each one file on the method unit, against closed forms and by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clients.state import MemoryStore
from fedsim.config import ClientSection, load_config
from fedsim.method import Batch, ClientContext, ClientResult, RoundResult, TrainPlan
from fedsim.runner import run_experiment
from strategies.fednova import FedNova, normalizing_factor
from strategies.moon import Moon, representation

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"


@pytest.mark.parametrize("steps, rho", [(1, 0.0), (7, 0.0), (5, 0.5), (12, 0.9)])
def test_fednova_factor_is_the_sum_of_momentum_coefficients(steps, rho):
    # SGD with momentum: after t steps, gradient k has been applied with weight sum_{j<t-k} rho^j
    brute = sum(sum(rho**j for j in range(steps - k)) for k in range(steps))
    assert normalizing_factor(steps, rho) == pytest.approx(brute)


def nova_round(models, sizes, steps, current, momentum=0.0):
    clients = []
    for cid, (m, n, tau) in enumerate(zip(models, sizes, steps, strict=True)):
        a = normalizing_factor(tau, momentum)
        clients.append(ClientResult(cid, {"num_examples": n, "fednova_a": a},
                                    {"model": {"w": m}, "normalized": {"w": (current - m) / a}}))
    p = np.array(sizes) / sum(sizes)
    means = {"model": {"w": sum(pi * m for pi, m in zip(p, models, strict=True))},
             "normalized": {"w": sum(pi * c.outputs["normalized"]["w"] for pi, c in zip(p, clients,
                                                                                     strict=True))}}
    return RoundResult(clients=clients, means=means)


def test_fednova_with_equal_steps_is_fedavg_and_otherwise_normalizes(make_method):
    rng = np.random.default_rng(0)
    current = rng.normal(size=4)
    models = [rng.normal(size=4) for _ in range(3)]
    sizes = [10.0, 30.0, 60.0]
    method = make_method(sizes, "strategy.name=fednova")
    assert isinstance(method, FedNova)
    new, _ = method.aggregate(1, {"w": current}, nova_round(models, sizes, [5, 5, 5], current))
    np.testing.assert_allclose(new["w"], sum(s * m for s, m in zip(sizes, models, strict=True)) / 100)
    steps = [2, 5, 20]
    new, metrics = method.aggregate(1, {"w": current}, nova_round(models, sizes, steps, current))
    p = np.array(sizes) / 100
    tau_eff = float(p @ steps)
    expected = current - tau_eff * sum(pi * (current - m) / t for pi, m, t in zip(p, models, steps,
                                                                                   strict=True))
    np.testing.assert_allclose(new["w"], expected)
    assert metrics["fednova_tau_eff"] == pytest.approx(tau_eff)


def test_fednova_client_sends_its_update_over_its_factor():
    model = nn.Linear(3, 2)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.4)
    ctx = ClientContext(0, 1, TrainPlan(), start, {}, None, ClientSection(momentum=0.5), 0.1, steps=6)
    update = FedNova().after_training(ctx, model)
    factor = normalizing_factor(6, 0.5)
    for name in start:
        expected = np.full_like(start[name], 0.4 / factor)
        np.testing.assert_allclose(update.outputs["normalized"][name], expected, rtol=1e-5)
    assert update.metrics["fednova_a"] == pytest.approx(factor)


def test_fednova_runs_and_stragglers_lower_its_effective_steps(tmp_path):
    base = ["engine.backend=inprocess", "experiment.rounds=3", "strategy.name=fednova"]
    runs = [run_experiment(load_config(QUICKSTART, [*base, *extra, f"output.run_dir={tmp_path / str(i)}"]))
            for i, extra in enumerate([[], ["system.stragglers=0.5", "system.straggler_work=0.3"]])]
    assert runs[1].rounds["test_accuracy"].iloc[-1] > 0.3  # it learns (chance: 0.1)
    full, slowed = (r.rounds["fednova_tau_eff"].iloc[1:] for r in runs)
    assert (slowed.to_numpy() < full.to_numpy()).all()


def test_moon_contrastive_term_by_hand_and_previous_model_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    global_arrays = {k: v.detach().clone() for k, v in net.state_dict().items()}
    previous = {k: (v + 0.3).numpy() for k, v in global_arrays.items()}
    store = MemoryStore(previous=previous)

    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

    ctx = ClientContext(0, 2, TrainPlan(), global_arrays, {}, store, ClientSection(), 0.1,
                        model_factory=factory)
    moon = Moon({"mu": 2.0, "temperature": 0.5})
    term = moon.loss_terms(ctx)[0]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 4)
    value = term.penalty(net, Batch(x, net(x), None))
    z = net[:-1](x)
    old = factory()
    old.load_state_dict({k: torch.as_tensor(v) for k, v in previous.items()})
    glob = factory()
    glob.load_state_dict(global_arrays)
    pos = F.cosine_similarity(z, glob[:-1](x), dim=1) / 0.5
    neg = F.cosine_similarity(z, old[:-1](x), dim=1) / 0.5
    expected = -torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(neg))).mean()
    assert value.item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    moon.after_training(ctx, net)  # the local model becomes next round's previous model
    for name, tensor in net.state_dict().items():
        np.testing.assert_array_equal(store["previous"][name], tensor.numpy())
    assert representation(net, x).shape == (5, 3)


def test_moon_runs_and_its_first_round_equals_fedavg(tmp_path):
    # Before a client's first round its previous model is the global one: l_con is constant.
    base = ["engine.backend=inprocess", "experiment.rounds=1", "strategy.clients_per_round=20"]
    moon = run_experiment(load_config(QUICKSTART, [*base, "strategy.name=moon",
                                                   f"output.run_dir={tmp_path / 'moon'}"]))
    avg = run_experiment(load_config(QUICKSTART, [*base, "engine.lockstep=false",
                                                  f"output.run_dir={tmp_path / 'avg'}"]))
    with np.load(moon.run_dir / "model.npz") as a, np.load(avg.run_dir / "model.npz") as b:
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5)
