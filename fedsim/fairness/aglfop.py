"""AGLFOP: the best accuracy any predictor Yhat(s, z, y) can reach on a federation's data under
global and local fairness budgets, I(Z; Yhat) <= eps_global and I(Z; Yhat | S) <= eps_local.

A convex program over Q(s, z, y, yhat) with sum_yhat Q = P(s, z, y); the information terms are
written as relative-entropy sums (exponential cones), so cvxpy solves it exactly. Budgets in bits.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from fedsim.fairness.pid import LN2, _normalized, marginal_operator


def information_budget(joint: cp.Expression, independent: cp.Expression, bits: float) -> cp.Constraint:
    """sum rel_entr(joint, independent) <= bits (in nats inside); a zero budget is the exact
    linear independence constraint, which interior-point cone solvers handle poorly."""
    if bits <= 0:
        return joint == independent
    return cp.sum(cp.rel_entr(joint, independent)) <= bits * LN2


def roc_constraints(q: cp.Variable, shape: tuple[int, ...], p: np.ndarray,
                    roc: np.ndarray) -> list[cp.Constraint]:
    """Each group's (FPR, TPR) must lie in the convex hull of the ROC points `roc` (k x 2, with
    (0, 0) and (1, 1) added): the model-specific AGLFOP, binary labels only."""
    points = np.vstack([[0.0, 0.0], [1.0, 1.0], np.asarray(roc, dtype=np.float64)])
    q_zyyhat = marginal_operator(shape, (1, 2, 3)) @ q  # Q(z, y, yhat), flattened
    z_size = shape[1]
    p_zy = p.sum(axis=0)
    mix = cp.Variable((z_size, len(points)), nonneg=True)
    constraints = [cp.sum(mix, axis=1) == 1]
    for z in range(z_size):
        for y, column in ((0, 0), (1, 1)):  # FPR from y = 0, TPR from y = 1
            predicted_positive = q_zyyhat[(z * 2 + y) * 2 + 1]
            constraints.append(predicted_positive == p_zy[z, y] * (mix[z] @ points[:, column]))
    return constraints


def aglfop(joint_szy: np.ndarray, eps_global: float, eps_local: float,
           roc: np.ndarray | None = None) -> float:
    """Best achievable accuracy Pr(Yhat = Y) with I(Z;Yhat) <= eps_global, I(Z;Yhat|S) <= eps_local.

    `joint_szy`: non-negative array of shape (S, Z, Y), counts or probabilities. `roc`: optional
    (FPR, TPR) points of a trained classifier; then every group's (FPR, TPR) must lie inside
    their convex hull (the model-specific variant; binary Y).
    """
    return aglfop_predictor(joint_szy, eps_global, eps_local, roc)[0]


def aglfop_predictor(joint_szy: np.ndarray, eps_global: float, eps_local: float,
                     roc: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """The AGLFOP optimum and the optimal joint Q(s, z, y, yhat) (normalized) that attains it."""
    p = _normalized(joint_szy, 3)
    s_size, z_size, y_size = p.shape
    shape = (s_size, z_size, y_size, y_size)  # (s, z, y, yhat)
    q = cp.Variable(int(np.prod(shape)), nonneg=True)
    p_z = p.sum(axis=(0, 2))
    p_s = p.sum(axis=(1, 2))
    p_z_given_s = np.divide(p.sum(axis=2), p_s[:, None], out=np.zeros((s_size, z_size)),
                            where=p_s[:, None] > 0)
    q_zyhat = marginal_operator(shape, (1, 3)) @ q  # Q(z, yhat)
    q_yhat = marginal_operator(shape, (3,)) @ q
    expected_global = cp.hstack([p_z[z] * q_yhat for z in range(z_size)])  # p(z) Q(yhat), (z, yhat)
    q_szyhat = marginal_operator(shape, (0, 1, 3)) @ q  # Q(s, z, yhat)
    q_syhat = marginal_operator(shape, (0, 3)) @ q  # Q(s, yhat)
    expected_local = cp.hstack([p_z_given_s[s, z] * q_syhat[s * y_size:(s + 1) * y_size]
                                for s in range(s_size) for z in range(z_size)])
    correct = np.zeros(shape)
    for y in range(y_size):
        correct[:, :, y, y] = 1.0
    constraints = [marginal_operator(shape, (0, 1, 2)) @ q == p.ravel(),
                   information_budget(q_zyhat, expected_global, eps_global),
                   information_budget(q_szyhat, expected_local, eps_local)]
    if roc is not None:
        if y_size != 2:
            raise ValueError("the ROC-constrained AGLFOP needs a binary label")
        constraints += roc_constraints(q, shape, p, roc)
    problem = cp.Problem(cp.Maximize(correct.ravel() @ q), constraints)
    problem.solve(solver=cp.CLARABEL)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"the AGLFOP program did not solve: {problem.status}")
    return float(problem.value), np.clip(q.value, 0.0, None).reshape(shape)


def aglfop_frontier(joint_szy: np.ndarray, global_budgets: list[float], local_budgets: list[float],
                    roc: np.ndarray | None = None) -> np.ndarray:
    """Best accuracy on a grid of budgets: entry [i, j] for (global_budgets[i], local_budgets[j])."""
    return np.array([[aglfop(joint_szy, g, lo, roc) for lo in local_budgets] for g in global_budgets])
