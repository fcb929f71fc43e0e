"""FedLD (loss decomposition, MICCAI 2024): margin control on the clients, principal-gradient
aggregation on the server.

Client: lam * log(1 + ||softmax(logits)||_F^2) over the whole batch is added to the loss; the
Frobenius norm of the batch's probability matrix is smallest for uniform predictions, so the
term penalizes over-confident local models.
Server: per float parameter tensor, the m client deltas G (m x d) are combined along their top
k = floor(m * k_proportion) uncentered principal directions v_j, each weighted by its share of
the eigenvalues lambda_j = sigma_j^2 / m and by the clients' norms signed by their projection:

    g = sum_{j<k} (lambda_j / sum_j' lambda_j') * mean_i(||G_i|| sign(G_i . v_j)) * v_j

Buffers (BatchNorm statistics, counters) are averaged as in FedAvg, not revised.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedsim.method import Arrays, Batch, ClientContext, LossTerm, Method, NoParams, RoundResult


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


class MarginControl(LossTerm):
    """FedLD's margin control: lam * log(1 + ||softmax(logits)||_F^2) over the whole batch."""

    name = "margin"
    per_client = ()

    class Params(NoParams):
        lam: float = Field(0.03, ge=0, description="weight of the margin term")

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        squares = torch.softmax(batch.logits, dim=1).pow(2)
        if batch.weights is not None:  # padding rows of a vectorized batch do not count
            squares = squares * (batch.weights > 0).unsqueeze(1)
        return self.params.lam * torch.log1p(squares.sum())


class FedLD(Method):
    """Margin-control regularizer on the clients, principal-gradient aggregation on the server."""

    name = "fedld"
    per_client_updates = True

    class Params(NoParams):
        margin_lambda: float = Field(0.03, ge=0, description="weight of log(1 + ||softmax||_F^2)")
        k_proportion: float = Field(0.8, gt=0, le=1, description="share of principal directions kept")
        mean_first_round: bool = Field(True, description="plain mean in round 1, as the reference code")

    # ---- client half -----------------------------------------------------------------------
    def loss_terms(self, ctx: ClientContext) -> list[LossTerm]:
        if self.params.margin_lambda == 0:
            return []
        return [MarginControl(MarginControl.Params(lam=self.params.margin_lambda), ctx)]

    # ---- server half -----------------------------------------------------------------------
    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        new = dict(result.means["model"])  # buffers: the FedAvg mean
        if server_round == 1 and self.params.mean_first_round:
            unweighted = {name: np.mean([c.outputs["model"][name] for c in result.clients], axis=0)
                          for name in self.run.param_names}
            return {**new, **{n: v.astype(current[n].dtype) for n, v in unweighted.items()}}, {}
        step = fedavg_step = 0.0
        for name in self.run.param_names:
            base = current[name]
            deltas = np.stack([(c.outputs["model"][name] - base).ravel() for c in result.clients])
            update = principal_gradient(deltas, self.params.k_proportion)
            new[name] = (base + update.reshape(base.shape)).astype(base.dtype)
            step += float(update @ update)
            fedavg_step += float(np.sum((result.means["model"][name] - base.astype(np.float64)) ** 2))
        # the step's length over FedAvg's (the example-weighted mean delta) from the same updates
        return new, {"fedld_step_ratio": math.sqrt(step / fedavg_step) if fedavg_step > 0 else math.nan}
