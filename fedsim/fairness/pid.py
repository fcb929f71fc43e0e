"""Partial information decomposition of the disparity a model's predictions carry about a
sensitive attribute Z, with the client S as the second source (Bertschinger et al., "BROJA").

    global disparity  I(Z; Yhat)      = Uni + Red
    local disparity   I(Z; Yhat | S)  = Uni + Syn
    Uni = min over Q with Q(z, yhat) = P(z, yhat) and Q(z, s) = P(z, s) of I_Q(Z; Yhat | S)

The minimization is an exponential-cone program solved by cvxpy (Clarabel). All values in bits.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
from scipy import sparse

LN2 = np.log(2.0)


def _normalized(joint: np.ndarray, ndim: int) -> np.ndarray:
    joint = np.asarray(joint, dtype=np.float64)
    if joint.ndim != ndim or (joint < 0).any() or joint.sum() <= 0:
        raise ValueError(f"expected a non-negative array of {ndim} dimensions with a positive sum, "
                         f"got shape {joint.shape}")
    return joint / joint.sum()


def _entropy_terms(p: np.ndarray) -> float:
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def mutual_information(pxy: np.ndarray) -> float:
    """I(X; Y) in bits of a 2-D joint distribution (counts or probabilities)."""
    p = _normalized(pxy, 2)
    return (_entropy_terms(p.sum(1)) + _entropy_terms(p.sum(0)) - _entropy_terms(p)) / LN2


def conditional_mutual_information(p_sxy: np.ndarray) -> float:
    """I(X; Y | S) in bits of a joint distribution with axes (S, X, Y)."""
    p = _normalized(p_sxy, 3)
    total = 0.0
    for block in p:
        if block.sum() > 0:
            total += block.sum() * mutual_information(block)
    return total


def marginal_operator(shape: tuple[int, ...], keep: tuple[int, ...]) -> sparse.csr_matrix:
    """The 0/1 matrix M with M @ q.ravel() = q.sum(over the axes not in `keep`).ravel()."""
    cells = np.arange(int(np.prod(shape))).reshape(shape)
    kept_shape = tuple(shape[a] for a in keep)
    rows = np.ravel_multi_index(np.indices(shape)[list(keep)].reshape(len(keep), -1), kept_shape)
    return sparse.csr_matrix((np.ones(cells.size), (rows, cells.ravel())),
                             shape=(int(np.prod(kept_shape)), cells.size))


def broadcast_operator(shape: tuple[int, ...], keep: tuple[int, ...]) -> sparse.csr_matrix:
    """The matrix giving, for every cell, its marginal over `keep` (the marginal broadcast back)."""
    marginal = marginal_operator(shape, keep)
    return (marginal.T @ marginal).tocsr()


def unique_information(p_szy: np.ndarray) -> float:
    """Uni(Z : Yhat \\ S) in bits for a normalized joint with axes (S, Z, Yhat)."""
    shape = p_szy.shape
    q = cp.Variable(p_szy.size, nonneg=True)  # Q(s, z, yhat), flattened
    objective = cp.sum(cp.rel_entr(q, broadcast_operator(shape, (0, 2)) @ q))  # -H_Q(Z|Yhat,S), nats
    constraints = [marginal_operator(shape, (1, 2)) @ q == p_szy.sum(axis=0).ravel(),
                   marginal_operator(shape, (0, 1)) @ q == p_szy.sum(axis=2).ravel()]
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(solver=cp.CLARABEL)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"the BROJA program did not solve: {problem.status}")
    p_sz = p_szy.sum(axis=2)
    h_z_given_s = _entropy_terms(p_sz) - _entropy_terms(p_sz.sum(axis=1))
    return (h_z_given_s + problem.value) / LN2


def pid_decomposition(joint: np.ndarray) -> dict[str, float]:
    """Decompose the disparity of predictions Yhat about Z with clients S.

    `joint`: non-negative array of shape (S, Z, Yhat), counts or probabilities. Returns, in bits,
    `global_disparity` I(Z;Yhat), `local_disparity` I(Z;Yhat|S), `unique`, `redundant`, `masked`
    (synergistic) and `client_information` I(Z;S). Solver noise is clipped so that every term
    lies in its feasible range (0 <= Uni <= min(global, local)).
    """
    p = _normalized(joint, 3)
    global_disparity = mutual_information(p.sum(axis=0))
    local_disparity = conditional_mutual_information(p)
    unique = float(np.clip(unique_information(p), 0.0, min(global_disparity, local_disparity)))
    return {"global_disparity": float(global_disparity), "local_disparity": float(local_disparity),
            "unique": unique, "redundant": float(global_disparity - unique),
            "masked": float(local_disparity - unique),
            "client_information": float(mutual_information(p.sum(axis=2)))}
