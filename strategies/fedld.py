"""FedLD (loss decomposition, MICCAI 2024): margin control on the clients, principal-gradient
aggregation on the server.

Per float parameter tensor, the m client deltas G (m x d) are combined along their top
k = floor(m * k_proportion) uncentered principal directions v_j, each weighted by its share of
the eigenvalues lambda_j = sigma_j^2 / m and by the clients' norms signed by their projection:

    g = sum_{j<k} (lambda_j / sum_j' lambda_j') * mean_i(||G_i|| sign(G_i . v_j)) * v_j

Buffers (BatchNorm statistics, counters) are averaged as in FedAvg, not revised.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedsim.engine.protocol import Arrays
from strategies.base import FedsimStrategy, RoundResult


def principal_gradient(deltas: np.ndarray, k_proportion: float = 0.8, eps: float = 1e-12) -> np.ndarray:
    """Aggregate the rows of `deltas` (m x d) into one update (d,) along their principal directions.

    The plain mean when d == 1. At least one direction is kept (so one client's delta is itself),
    and at most min(m, d).
    Exact zero projections contribute no sign; an all-zero matrix gives a zero update.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    m, d = deltas.shape
    if d == 1:
        return deltas.mean(axis=0)
    _, sigma, vt = np.linalg.svd(deltas, full_matrices=False)
    eigenvalues = sigma**2 / m
    total = eigenvalues.sum()
    if total <= eps:
        return np.zeros(d)
    k = max(1, math.floor(m * k_proportion))
    directions = vt[:k]  # (k, d)
    norms = np.linalg.norm(deltas, axis=1)  # (m,)
    signs = np.sign(deltas @ directions.T)  # (m, k)
    magnitudes = (norms[:, None] * signs).mean(axis=0)  # (k,)
    return ((eigenvalues[:k] / total) * magnitudes) @ directions


class FedLDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    margin_lambda: float = Field(0.03, ge=0, description="weight of log(1 + ||softmax||_F^2)")
    k_proportion: float = Field(0.8, gt=0, le=1, description="share of principal directions kept")
    mean_first_round: bool = Field(True, description="plain mean in round 1, as the reference code")


class FedLD(FedsimStrategy):
    """Margin-control regularizer on the clients, principal-gradient aggregation on the server."""

    name = "fedld"
    Params = FedLDParams
    per_client_updates: ClassVar[bool] = True

    def client_config(self, server_round: int) -> dict[str, Any]:
        if self.params.margin_lambda == 0:
            return {}
        return {"objectives": {"margin": {"lam": self.params.margin_lambda}}}

    def aggregate(self, server_round: int, current: Arrays, result: RoundResult) -> Arrays:
        new = dict(result.means["model"])  # buffers: the FedAvg mean
        if server_round == 1 and self.params.mean_first_round:
            unweighted = {name: np.mean([c.outputs["model"][name] for c in result.clients], axis=0)
                          for name in self.param_names}
            return {**new, **{n: v.astype(current[n].dtype) for n, v in unweighted.items()}}
        for name in self.param_names:
            base = current[name]
            deltas = np.stack([(c.outputs["model"][name] - base).ravel() for c in result.clients])
            update = principal_gradient(deltas, self.params.k_proportion)
            new[name] = (base + update.reshape(base.shape)).astype(base.dtype)
        return new
