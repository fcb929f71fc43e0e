"""PGD and FGSM against hand-computed steps and their expected ordering; robust evaluation and
federated adversarial training end to end."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.api import run
from fedsim.attacks import fgsm, pgd
from fedsim.config import ClientSection, FalSection, RobustSection
from fedsim.evaluation import robust_accuracy
from fedsim.method import Batch, ClientContext, TrainPlan
from fedsim.report import build_report
from strategies.fal import AdversarialLoss

QUICKSTART = "experiments/quickstart.toml"


def logistic(d: int = 5, classes: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, classes).double()


def input_gradient(model: nn.Linear, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d mean CE / dx for softmax regression, by hand: (softmax(Wx + b) - onehot(y)) W / n."""
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p @ w / len(y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_pgd_step_equals_the_hand_computed_one(norm):
    model = logistic()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    eps, step = 0.3, 0.2
    got = pgd(model, torch.tensor(x), torch.tensor(y), eps, steps=1, step_size=step, norm=norm).numpy()
    g = input_gradient(model, x, y)
    if norm == "linf":
        expected = x + np.clip(step * np.sign(g), -eps, eps)
    else:
        move = step * g / np.linalg.norm(g, axis=1, keepdims=True)
        expected = x + move * np.minimum(1.0, eps / np.linalg.norm(move, axis=1, keepdims=True))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # only the inputs got gradients


def test_pgd_stays_in_the_ball_and_the_input_range():
    model = logistic()
    x = torch.rand(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    for norm in ("linf", "l2"):
        adv = pgd(model, x, y, 0.25, steps=7, step_size=0.1, norm=norm, random_start=True,
                  input_range=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
        size = (adv - x).abs().amax(dim=1) if norm == "linf" else (adv - x).norm(dim=1)
        assert (size <= 0.25 + 1e-9).all() and adv.min() >= 0 and adv.max() <= 1


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on scikit-learn's digits, and its test split (inputs in [0, 1])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:1400]), y[:1400]).backward()
        optimizer.step()
    return model, x[1400:], y[1400:]


def test_robust_accuracy_falls_with_eps_and_pgd_is_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    spec = RobustSection(eps=[0.0, 0.02, 0.05, 0.1, 0.2], input_range=[0.0, 1.0])
    accuracy = robust_accuracy(model, x, y, spec)
    for attack in ("pgd", "fgsm"):
        curve = [accuracy[f"robust_{attack}_accuracy_eps{e:g}"] for e in spec.eps]
        assert curve == sorted(curve, reverse=True) and curve[-1] < curve[0] - 0.2
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy["robust_pgd_accuracy_eps0"] == pytest.approx(clean)
    assert accuracy["robust_clean_accuracy"] == pytest.approx(clean)
    for e in spec.eps[1:]:
        assert accuracy[f"robust_pgd_accuracy_eps{e:g}"] <= accuracy[f"robust_fgsm_accuracy_eps{e:g}"]
    fgsm_by_hand = (model(fgsm(model, x, y, 0.1, (0.0, 1.0))).argmax(1) == y).float().mean().item()
    assert accuracy["robust_fgsm_accuracy_eps0.1"] == pytest.approx(fgsm_by_hand)


def test_the_adversarial_term_turns_the_loss_into_the_mix(trained):
    """Clean CE + the term = clean_share CE(clean) + (1 - clean_share) CE(PGD examples)."""
    model, x, y = trained
    params = FalSection(eps=0.1, steps=3, clean_share=0.25, random_start=False)
    ctx = ClientContext(0, 1, TrainPlan(), {}, {}, None, ClientSection(), 0.1)
    term = AdversarialLoss(params, ctx)
    logits = model(x)
    total = F.cross_entropy(logits, y) + term.penalty(model, Batch(x, logits, y))
    adv = pgd(model, x, y, 0.1, 3, params.step_for(0.1))
    expected = 0.25 * F.cross_entropy(logits, y) + 0.75 * F.cross_entropy(model(adv), y)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fal_beside_fedavg_reports_robust_accuracy_and_raises_it(tmp_path):
    common = ["engine.backend=inprocess", "experiment.rounds=10", "evaluation.robust.eps=[0.1]",
              "evaluation.robust.input_range=[0, 1]", "output.save_model=false"]
    plain = run(QUICKSTART, *common, f"output.dir={tmp_path / 'plain'}")
    robust = run(QUICKSTART, *common, "fal.enabled=true", "fal.steps=5", "fal.input_range=[0, 1]",
                 f"output.dir={tmp_path / 'fal'}")
    a, b = (pd.read_parquet(s.run_dir / "rounds.parquet").iloc[-1] for s in (plain, robust))
    columns = [c for c in a.index if "robust" in c]
    assert columns == ["robust_clean_accuracy", "robust_pgd_accuracy_eps0.1", "robust_fgsm_accuracy_eps0.1"]
    assert b["robust_pgd_accuracy_eps0.1"] > a["robust_pgd_accuracy_eps0.1"]
    assert b["test_accuracy"] > 0.8
    page = build_report([plain.run_dir, robust.run_dir], tmp_path / "report.html").read_text()
    assert "Robustness and accuracy" in page
    assert "fedavg (PGD)" in page and "fedavg (FGSM)" in page
