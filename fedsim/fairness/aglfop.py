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


def aglfop(joint_szy: np.ndarray, eps_global: float, eps_local: float) -> float:
    """Best achievable accuracy Pr(Yhat = Y) with I(Z;Yhat) <= eps_global, I(Z;Yhat|S) <= eps_local.

    `joint_szy`: non-negative array of shape (S, Z, Y), counts or probabilities.
    """
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
    problem = cp.Problem(cp.Maximize(correct.ravel() @ q), [
        marginal_operator(shape, (0, 1, 2)) @ q == p.ravel(),
        information_budget(q_zyhat, expected_global, eps_global),
        information_budget(q_szyhat, expected_local, eps_local)])
    problem.solve(solver=cp.CLARABEL)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"the AGLFOP program did not solve: {problem.status}")
    return float(problem.value)


def aglfop_frontier(joint_szy: np.ndarray, global_budgets: list[float],
                    local_budgets: list[float]) -> np.ndarray:
    """Best accuracy on a grid of budgets: entry [i, j] for (global_budgets[i], local_budgets[j])."""
    return np.array([[aglfop(joint_szy, g, lo) for lo in local_budgets] for g in global_budgets])
