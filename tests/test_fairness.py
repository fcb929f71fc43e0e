"""PID of disparity and AGLFOP against canonical cases, brute force and an independent LP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import linprog

from fedsim.config import load_config
from fedsim.fairness.aglfop import aglfop, aglfop_frontier, aglfop_predictor
from fedsim.fairness.groups import (
    counts_from_metrics,
    counts_to_metrics,
    fairness_metrics,
    group_confusion,
    parity_gaps,
)
from fedsim.fairness.pid import mutual_information, pid_decomposition
from fedsim.method import Batch, ClientResult, RoundResult
from fedsim.runner import run_experiment
from fedsim.terms import ParityConstraint, ParityPenalty


def joint_of(cells: list[tuple[int, int, int]], shape=(2, 2, 2)) -> np.ndarray:
    joint = np.zeros(shape)
    for cell in cells:
        joint[cell] += 1
    return joint


def test_canonical_cases_give_one_bit_of_the_right_kind():
    unique = pid_decomposition(joint_of([(s, z, z) for s in (0, 1) for z in (0, 1)]))  # Yhat = Z, S indep.
    assert unique["unique"] == pytest.approx(1, abs=1e-6)
    assert unique["redundant"] == pytest.approx(0, abs=1e-6)
    redundant = pid_decomposition(joint_of([(0, 0, 0), (1, 1, 1)]))  # Yhat = Z = S
    assert redundant["redundant"] == pytest.approx(1, abs=1e-6) and redundant["local_disparity"] == 0
    masked = pid_decomposition(joint_of([(s, y ^ s, y) for s in (0, 1) for y in (0, 1)]))  # Z = Yhat xor S
    assert masked["masked"] == pytest.approx(1, abs=1e-6) and masked["global_disparity"] == 0


def brute_force_unique(p: np.ndarray, steps: int = 400) -> float:
    """min of I_Q(Z;Yhat|S) over Q with P's (z, yhat) and (s, z) marginals, two clients: the free
    parameters are a_z = Q(s=0, z, yhat=0), searched on a grid."""
    p = p / p.sum()
    p_zy, p_sz = p.sum(axis=0), p.sum(axis=2)
    best = np.inf
    ranges = [np.linspace(max(0, p_sz[0, z] - p_zy[z, 1]), min(p_sz[0, z], p_zy[z, 0]), steps)
              for z in (0, 1)]
    for a0 in ranges[0]:
        for a1 in ranges[1]:
            q0 = np.array([[a0, p_sz[0, 0] - a0], [a1, p_sz[0, 1] - a1]])
            q = np.stack([q0, p_zy - q0]).clip(0)
            value = sum(block.sum() * mutual_information(block) for block in q if block.sum() > 0)
            best = min(best, value)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_unique_information_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(8, 0.7)).reshape(2, 2, 2)
    terms = pid_decomposition(p)
    assert terms["unique"] == pytest.approx(brute_force_unique(p, 150), abs=2e-4)
    assert terms["global_disparity"] == pytest.approx(terms["unique"] + terms["redundant"])
    assert terms["local_disparity"] == pytest.approx(terms["unique"] + terms["masked"])
    assert terms["redundant"] <= min(terms["global_disparity"], terms["client_information"]) + 1e-6


def test_noisy_predictions_of_z_carry_unique_disparity_and_zero_cells_are_fine():
    joint = np.zeros((5, 2, 2))
    for s in range(5):
        joint[s] = [[40, 10], [10, 40]]  # Yhat = Z 80% of the time, same on every client
    joint[4, 1, :] = 0  # one client without group 1
    terms = pid_decomposition(joint)
    assert terms["unique"] > 0.2 and all(np.isfinite(v) and v >= 0 for v in terms.values())


def best_accuracy_independent_of_z(p_zy: np.ndarray) -> float:
    """One client, zero budget: maximize Pr(Yhat = Y) over Q(z, y, yhat) with Yhat independent of Z,
    an LP solved by scipy (HiGHS) in a formulation of its own."""
    p_zy = p_zy / p_zy.sum()
    z_size, y_size = p_zy.shape
    n = z_size * y_size * y_size  # variables Q(z, y, yhat)
    idx = np.arange(n).reshape(z_size, y_size, y_size)
    equalities, rhs = [], []
    for z in range(z_size):
        for y in range(y_size):
            row = np.zeros(n)
            row[idx[z, y, :]] = 1
            equalities.append(row)
            rhs.append(p_zy[z, y])
    p_z = p_zy.sum(axis=1)
    for z in range(z_size):  # Q(z, yhat) = p(z) * Q(yhat)
        for yhat in range(y_size):
            row = np.zeros(n)
            row[idx[z, :, yhat]] += 1
            row[idx[:, :, yhat].ravel()] -= p_z[z]
            equalities.append(row)
            rhs.append(0.0)
    gain = np.zeros(n)
    for y in range(y_size):
        gain[idx[:, y, y]] = 1
    result = linprog(-gain, A_eq=np.array(equalities), b_eq=rhs, bounds=(0, None), method="highs")
    return -result.fun


def test_aglfop_matches_an_independent_lp_at_zero_budget_and_reaches_one_without_budget():
    rng = np.random.default_rng(7)
    for _ in range(3):
        p_zy = rng.dirichlet(np.ones(4)).reshape(2, 2)
        ours = aglfop(p_zy[None], eps_global=0.0, eps_local=0.0)
        assert ours == pytest.approx(best_accuracy_independent_of_z(p_zy), abs=1e-4)
    assert aglfop(rng.random((3, 2, 2)), 10.0, 10.0) == pytest.approx(1.0, abs=1e-6)


def test_frontier_grows_with_the_budgets():
    joint = np.random.default_rng(3).random((4, 2, 2)) * [[[1, 3], [3, 1]]]
    budgets = [0.0, 0.005, 0.02, 0.1]
    frontier = aglfop_frontier(joint, budgets, budgets)
    assert np.all(np.diff(frontier, axis=0) >= -1e-5) and np.all(np.diff(frontier, axis=1) >= -1e-5)
    assert frontier[0, 0] < frontier[-1, -1]


def test_group_confusion_and_parity_gaps_by_hand():
    z = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    yhat = np.array([0, 1, 1, 1, 0, 0, 0, 1])
    counts = group_confusion(y, yhat, z, num_groups=2, num_classes=2)
    assert counts.shape == (2, 2, 2) and counts.sum() == 8 and counts[0, 0, 1] == 1
    gaps = parity_gaps(counts)
    assert gaps["sp_gap"] == pytest.approx(abs(1 / 4 - 3 / 4))
    assert gaps["tpr_gap"] == pytest.approx(abs(1 / 2 - 1.0))
    assert gaps["fpr_gap"] == pytest.approx(abs(0.0 - 1 / 2))
    assert counts_from_metrics({"eval_loss": 1.0, **counts_to_metrics(counts)}).tolist() == counts.tolist()


def test_fairness_metrics_skip_clients_missing_a_group():
    full = np.array([[[5, 5], [2, 8]], [[8, 2], [5, 5]]], dtype=float)
    one_group = full.copy()
    one_group[1] = 0
    metrics = fairness_metrics({0: full, 1: full, 2: one_group})
    assert metrics["fair_clients_skipped"] == 1
    assert metrics["fair_local_sp_gap_max"] == pytest.approx(parity_gaps(full)["sp_gap"])
    assert metrics["pid_global_disparity"] == pytest.approx(
        metrics["pid_unique"] + metrics["pid_redundant"])


@pytest.mark.parametrize("split, dominant", [("heterogeneity", "pid_redundant"), ("synergy", "pid_masked")])
def test_adult_splits_show_the_disparity_kind_the_paper_reports(split, dominant, tmp_path, data_dir):
    config = load_config(None, [
        "data.dataset=adult", f"data.partition.kind={split}", "data.num_clients=2",
        "strategy.clients_per_round=2", "model.name=logreg", "experiment.rounds=3",
        "engine.backend=inprocess", "client.batch_size=64", "client.lr=0.1",
        f"output.run_dir='{tmp_path}'"])
    last = run_experiment(config).rounds.iloc[-1]
    assert 0.75 < last["test_accuracy"] < 0.9 and np.isfinite(last["test_sp_gap"])
    assert last["pid_global_disparity"] == pytest.approx(last["pid_unique"] + last["pid_redundant"])
    assert last["pid_local_disparity"] == pytest.approx(last["pid_unique"] + last["pid_masked"])
    other = "pid_masked" if dominant == "pid_redundant" else "pid_redundant"
    assert last[dominant] > 2 * last[other]
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    assert {"fair_n_1_1_1", "fair_n_0_0_0"} <= set(clients.columns)


def fake_round(models: list[np.ndarray], sizes: list[float], extra: list[dict]) -> RoundResult:
    clients = [ClientResult(i, {"num_examples": n, **e}, {"model": {"w": m}})
               for i, (m, n, e) in enumerate(zip(models, sizes, extra, strict=True))]
    mean = sum(n * m for m, n in zip(models, sizes, strict=True)) / sum(sizes)
    return RoundResult(clients=clients, means={"model": {"w": mean}})


def test_fairfed_moves_weight_away_from_clients_whose_fairness_deviates(make_method):
    fair = np.array([[[10, 10], [10, 10]], [[10, 10], [10, 10]]], float)  # local SP gap 0
    unfair = np.array([[[20, 0], [20, 0]], [[0, 20], [0, 20]]], float)  # local SP gap 1
    counts = [fair, fair, unfair]
    models = [np.array([1.0]), np.array([2.0]), np.array([10.0])]
    extra = [counts_to_metrics(c, prefix="pre_") for c in counts]
    strategy = make_method([40, 40, 40], "strategy.name=fairfed", "strategy.beta=0.2")
    new, metrics = strategy.aggregate(1, {"w": np.array([0.0])}, fake_round(models, [40, 40, 40], extra))
    global_gap = parity_gaps(sum(counts))["sp_gap"]
    deviation = np.abs(np.array([0.0, 0.0, 1.0]) - global_gap)
    weights = np.clip(np.full(3, 1 / 3) - 0.2 * (deviation - deviation.mean()), 0, None)
    weights /= weights.sum()
    assert new["w"][0] == pytest.approx(weights @ [1.0, 2.0, 10.0])
    assert weights[2] < 1 / 3
    assert metrics["fairfed_weight_max"] == pytest.approx(weights.max())
    np.testing.assert_allclose(strategy.state["weights"], weights)  # the state the next round starts from
    fedavg = make_method([10, 30, 60], "strategy.name=fairfed", "strategy.beta=0")
    same, _ = fedavg.aggregate(1, {"w": np.array([0.0])}, fake_round(models, [10, 30, 60], extra))
    assert same["w"][0] == pytest.approx(0.1 * 1 + 0.3 * 2 + 0.6 * 10)  # beta = 0 is FedAvg


def test_qffl_follows_the_paper_update(make_method):
    current = {"w": np.array([1.0, -1.0])}
    models = [np.array([0.5, -0.5]), np.array([2.0, 0.0])]
    losses = [0.5, 2.0]
    lr = 0.1
    extra = [{"global_train_loss": f} for f in losses]
    for q in (0.0, 1.0, 2.0):
        strategy = make_method([5, 5], "strategy.name=qffl", f"strategy.q={q}", f"client.lr={lr}")
        new, _ = strategy.aggregate(1, current, fake_round(models, [5, 5], extra))
        L = 1 / lr
        deltas = [L * (current["w"] - m) for m in models]
        numerator = sum(f**q * d for f, d in zip(losses, deltas, strict=True))
        h = sum((q * f ** (q - 1) * (d @ d) if q else 0.0) + L * f**q
                for f, d in zip(losses, deltas, strict=True))
        np.testing.assert_allclose(new["w"], current["w"] - numerator / h)
    q0 = make_method([5, 5], "strategy.name=qffl", "strategy.q=0")
    np.testing.assert_allclose(q0.aggregate(1, current, fake_round(models, [5, 5], extra))[0]["w"],
                               np.mean(models, axis=0))  # q = 0: the plain mean of the models


def test_parity_penalty_by_hand_and_its_gradient():
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    groups = torch.tensor([1, 1, 0, 0])
    positive = torch.softmax(logits.detach(), dim=1)[:, 1]
    expected = 0.5 * abs(positive[:2].mean() - positive[2:].mean())
    parity = ParityPenalty(ParityPenalty.Params(mu=0.5), None)
    value = parity.penalty(None, Batch(None, logits, None, groups))
    assert value.item() == pytest.approx(expected.item())
    value.backward()
    assert logits.grad.abs().sum() > 0
    assert parity.penalty(None, Batch(None, logits, None, torch.ones(4, dtype=torch.long))) == 0


def test_the_reference_parity_constraint_is_fairtorchs_loss_by_hand():
    # fairtorch: mu = (m_0, m_1, m), M = [[1, 0, -1], [-1, 0, 1]] twice, loss = alpha * sum relu(M mu)^2
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.0]], requires_grad=True)
    groups = torch.tensor([1, 1, 0, 0, 0])
    for squash in (False, True):
        p = torch.softmax(logits.detach(), dim=1)[:, 1]
        p = torch.sigmoid(p) if squash else p
        mu = torch.stack([p[groups == 0].mean(), p[groups == 1].mean(), p.mean()])
        matrix = torch.tensor([[1.0, 0, -1], [-1, 0, 1], [1, 0, -1], [-1, 0, 1]])
        fairtorch = 100.0 * (torch.relu(matrix @ mu) ** 2).sum()
        term = ParityConstraint(ParityConstraint.Params(squash=squash), None)
        value = term.penalty(None, Batch(None, logits, None, groups))
        assert value.item() == pytest.approx(2.0 * fairtorch.item(), rel=1e-6)  # weight 2
        share1 = 2 / 5  # the closed form: 2 alpha pi_1^2 (m_0 - m_1)^2, times the weight
        assert value.item() == pytest.approx(2 * 2 * 100 * share1**2 * (mu[0] - mu[1]).item() ** 2, rel=1e-5)
    value.backward()
    assert logits.grad.abs().sum() > 0
    assert term.penalty(None, Batch(None, logits, None, torch.zeros(5, dtype=torch.long))) == 0


def test_roc_region_caps_accuracy_at_the_classifiers_best_operating_point():
    # one client, Z independent of Y: the best operating point on the ROC hull gives the bound
    p_zy = np.array([[0.3, 0.2], [0.3, 0.2]])
    roc = np.array([[0.2, 0.7]])  # a classifier with FPR 0.2, TPR 0.7
    bounded = aglfop(p_zy[None], 10.0, 10.0, roc=roc)
    p_y = p_zy.sum(axis=0)
    vertices = [(0, 0), (1, 1), (0.2, 0.7)]  # accuracy is linear in (FPR, TPR): best at a vertex
    expected = max(p_y[0] * (1 - f) + p_y[1] * t for f, t in vertices)
    assert bounded == pytest.approx(expected, abs=1e-5) and bounded < 1
    assert aglfop(p_zy[None], 10.0, 10.0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("budgets", [(0.0, 0.0), (0.01, 0.002), (0.005, 0.05)])
def test_aglfop_solution_respects_its_constraints(budgets):
    eps_global, eps_local = budgets
    joint = np.random.default_rng(11).random((3, 2, 2)) * [[[1, 4], [4, 1]]]
    p = joint / joint.sum()
    accuracy, q = aglfop_predictor(joint, eps_global, eps_local)
    assert q.min() >= 0
    np.testing.assert_allclose(q.sum(axis=3), p, atol=1e-6)  # the data's (s, z, y) are kept
    q_szyhat = q.sum(axis=2)
    assert mutual_information(q_szyhat.sum(axis=0)) <= eps_global + 1e-5  # I(Z; Yhat)
    local = sum(block.sum() * mutual_information(block) for block in q_szyhat if block.sum() > 0)
    assert local <= eps_local + 1e-5  # I(Z; Yhat | S)
    assert accuracy == pytest.approx(sum(q[:, :, y, y].sum() for y in range(2)), abs=1e-6)


def test_pid_counts_the_clients_training_data_weighted_by_their_share(tmp_path, data_dir):
    """Two German-credit clients: the run's PID terms equal a decomposition computed here from
    the final model's predictions on each client's training rows (the PID paper's code), and
    differ from the one on the local test splits."""
    from fedsim.data.federation import build_federation
    from fedsim.fairness.pid import conditional_mutual_information
    from fedsim.models import build_model

    overrides = ["data.dataset=german", "data.partition.kind=heterogeneity", "data.num_clients=2",
                 "strategy.clients_per_round=2", "model.name=logreg", "experiment.rounds=2",
                 "engine.backend=inprocess", f"output.run_dir='{tmp_path}'"]
    config = load_config(None, overrides)
    last = run_experiment(config).rounds.iloc[-1]
    fed = build_federation(config.data, 0)
    model = build_model(config.model, fed.input_shape, fed.num_classes, 0)
    with np.load(tmp_path / "model.npz") as trained:
        model.load_state_dict({k: torch.as_tensor(trained[k]) for k in trained.files})

    def joint(split: str) -> np.ndarray:  # counts n(s, z, yhat)
        counts = np.zeros((2, 2, 2))
        for s in range(2):
            data = fed.client_data(s)
            x, z = (data.x_train, data.z_train) if split == "train" else (data.x_test, data.z_test)
            yhat = model(torch.as_tensor(x)).argmax(1).numpy()
            np.add.at(counts, (s, z, yhat), 1)
        return counts

    train = joint("train")
    p = train / train.sum()  # p(s) is each client's share of the training rows
    p_zy = p.sum(axis=0)
    by_hand = float(np.nansum(p_zy * np.log2(p_zy / np.outer(p_zy.sum(1), p_zy.sum(0)))))
    assert last["pid_global_disparity"] == pytest.approx(by_hand, abs=1e-9)
    assert last["pid_local_disparity"] == pytest.approx(conditional_mutual_information(p), abs=1e-9)
    assert last["pid_unique"] == pytest.approx(pid_decomposition(train)["unique"], abs=1e-6)
    assert abs(pid_decomposition(joint("test"))["global_disparity"] - by_hand) > 1e-6
