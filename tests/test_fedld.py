"""FedLD: principal-gradient aggregation against its closed form, the margin-control term, and
the loss decomposition (exact on a real run)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.decomposition import decompose
from fedsim.method import Batch, ClientResult, RoundResult
from fedsim.runner import run_experiment
from strategies.fedld import MarginControl, principal_gradient

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"


def closed_form(deltas: np.ndarray, k_proportion: float, flip_seed: int = 0) -> np.ndarray:
    """The FedLD update from the eigendecomposition of G^T G / m, eigenvectors' signs flipped at
    random (the update must not depend on them)."""
    m, d = deltas.shape
    eigenvalues, vectors = np.linalg.eigh(deltas.T @ deltas / m)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0, None), vectors[:, order]
    vectors = vectors * np.random.default_rng(flip_seed).choice([-1.0, 1.0], d)
    k = max(1, math.floor(m * k_proportion))
    update = np.zeros(d)
    for j in range(min(k, d)):  # at most rank-many directions exist
        v = vectors[:, j]
        strength = np.mean([np.linalg.norm(g) * np.sign(g @ v) for g in deltas])
        update += eigenvalues[j] / eigenvalues.sum() * strength * v
    return update


@pytest.mark.parametrize("m, d, k_proportion", [(5, 12, 0.8), (10, 4, 0.8), (7, 7, 0.5), (3, 30, 1.0)])
def test_principal_gradient_matches_the_closed_form_for_any_eigenvector_signs(m, d, k_proportion):
    deltas = np.random.default_rng(m * d).normal(size=(m, d))
    ours = principal_gradient(deltas, k_proportion)
    for flip in range(3):
        np.testing.assert_allclose(ours, closed_form(deltas, k_proportion, flip), atol=1e-10)
    np.testing.assert_allclose(principal_gradient(-deltas, k_proportion), -ours, atol=1e-12)


def test_principal_gradient_special_cases():
    rng = np.random.default_rng(0)
    column = rng.normal(size=(6, 1))
    np.testing.assert_allclose(principal_gradient(column), column.mean(axis=0))  # d == 1: the mean
    row = rng.normal(size=9)
    np.testing.assert_allclose(principal_gradient(np.tile(row, (4, 1))), row, atol=1e-12)  # identical
    np.testing.assert_allclose(principal_gradient(row[None, :]), row, atol=1e-12)  # one client
    assert not principal_gradient(np.zeros((4, 9))).any()
    # rank 2 with 6 clients: k = 4 directions, two of them with zero eigenvalue
    low_rank = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 15))
    np.testing.assert_allclose(principal_gradient(low_rank), closed_form(low_rank, 0.8), atol=1e-10)


def test_fedld_aggregates_parameters_by_principal_gradient_and_averages_buffers(make_method):
    strategy = make_method([10, 30, 20], "strategy.name=fedld")
    current = {"w": np.zeros((2, 3), np.float32), "bn.running_mean": np.zeros(2, np.float32)}
    rng = np.random.default_rng(1)
    clients = [ClientResult(i, {"num_examples": n},
                            {"model": {"w": rng.normal(size=(2, 3)).astype(np.float32),
                                       "bn.running_mean": np.full(2, float(i), np.float32)}})
               for i, n in enumerate([10.0, 30.0, 20.0])]
    means = {"model": {"w": np.zeros((2, 3)), "bn.running_mean": np.full(2, (0 * 10 + 30 + 2 * 20) / 60)}}
    result = RoundResult(clients=clients, means=means)
    new, _ = strategy.aggregate(2, current, result)
    deltas = np.stack([c.outputs["model"]["w"].ravel() for c in clients]).astype(np.float64)
    np.testing.assert_allclose(new["w"].ravel(), principal_gradient(deltas, 0.8), atol=1e-6)
    np.testing.assert_allclose(new["bn.running_mean"], means["model"]["bn.running_mean"])
    first, _ = strategy.aggregate(1, current, result)  # round 1: the unweighted mean, as the reference
    np.testing.assert_allclose(first["w"], np.mean([c.outputs["model"]["w"] for c in clients], axis=0))


def test_step_ratio_against_the_closed_form_for_orthogonal_client_deltas(make_method):
    """Deltas r_i e_i (distinct r_i, equal sizes): the principal directions are the e_i with
    lambda_i = r_i^2 / m, so g = sum over the k largest r_j of r_j^3 / (m sum r^2) e_j, while
    FedAvg's step is sum_i r_i e_i / m."""
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    m = len(r)
    strategy = make_method([1] * m, "strategy.name=fedld")
    k = math.floor(m * strategy.params.k_proportion)
    deltas = r[:, None] * np.eye(m)

    def aggregate(rows):
        clients = [ClientResult(i, {"num_examples": 1.0}, {"model": {"w": row.astype(np.float32)}})
                   for i, row in enumerate(rows)]
        means = {"model": {"w": rows.mean(axis=0)}}
        return strategy.aggregate(2, {"w": np.zeros(m, np.float32)},
                                  RoundResult(clients=clients, means=means))

    new, metrics = aggregate(deltas)
    top = np.sort(r)[::-1][:k]
    lengths = top**3 / (m * np.sum(r**2))
    np.testing.assert_allclose(np.sort(np.abs(new["w"]))[1:], np.sort(lengths), rtol=1e-6)
    assert metrics["fedld_step_ratio"] == pytest.approx(np.linalg.norm(lengths) / (np.linalg.norm(r) / m),
                                                        rel=1e-6)
    _, metrics = aggregate(np.tile(np.arange(m, dtype=float), (3, 1)))
    assert metrics["fedld_step_ratio"] == pytest.approx(1.0)  # identical updates: FedAvg's step itself


def test_margin_control_is_lambda_log_one_plus_squared_frobenius_norm_of_probabilities():
    term = MarginControl(MarginControl.Params(lam=0.03), None)
    uniform = torch.zeros(8, 4)  # B = 8 rows of uniform probabilities over C = 4: ||p||^2 = 8 / 4
    assert term.penalty(None, Batch(None, uniform, None)).item() == pytest.approx(0.03 * math.log(1 + 2.0))
    confident = torch.tensor([[50.0, 0.0, 0.0, 0.0]] * 8)  # one-hot rows: ||p||^2 = 8
    value = term.penalty(None, Batch(None, confident, None)).item()
    assert value == pytest.approx(0.03 * math.log(9.0), rel=1e-6)


def test_decompose_terms_telescope_to_the_aggregate_loss():
    rng = np.random.default_rng(3)
    cross, weights, aggregate = rng.random((5, 5)), rng.integers(1, 100, 5), rng.random(5)
    terms = decompose(cross, weights, aggregate)
    p = weights / weights.sum()
    assert sum(terms.values()) == pytest.approx(float(p @ aggregate), abs=1e-12)
    assert terms["local"] == pytest.approx(float(p @ np.diag(cross)))


@pytest.mark.parametrize("strategy", ["fedavg", "fedld"])
def test_decomposition_adds_up_exactly_on_a_real_run(strategy, tmp_path):
    config = load_config(QUICKSTART, [
        "engine.backend=inprocess", "experiment.rounds=3", f"strategy.name={strategy}",
        "evaluation.decomposition=true", "evaluation.decomposition_clients=6",
        f"output.run_dir='{tmp_path}'"])
    rounds = run_experiment(config).rounds.iloc[1:]
    total = rounds["decomp_local"] + rounds["decomp_shift"] + rounds["decomp_aggregation"]
    np.testing.assert_allclose(total, rounds["decomp_global"], rtol=1e-5)
    assert (rounds["decomp_identity_error"] < 1e-5).all()
    assert (rounds["decomp_clients"] == 6).all()  # capped below the cohort of 10
    assert (rounds["decomp_local"] > 0).all() and rounds["test_accuracy"].iloc[-1] > 0.5
