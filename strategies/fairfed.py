"""FairFed (Ezzeldin et al., AAAI 2023): fairness-aware aggregation weights.

Each round every client reports the group confusion counts of the received global model on its
own data; the server derives each client's local fairness gap F_i and the global gap F_g from
the pooled counts, and moves the client's weight against its deviation Delta_i = |F_i - F_g|:

    w_i <- w_i - beta * (Delta_i - mean_j Delta_j),  clipped at 0, renormalized over the round.

Weights start at the data shares and persist across rounds; beta = 0 is FedAvg. A client that
lacks a group gets Delta_i = mean_j Delta_j (no change).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fedsim.fairness.groups import counts_from_metrics, parity_gaps
from fedsim.method import Arrays, Method, NoParams, RoundResult


class FairFed(Method):
    """FedAvg with weights that shrink for clients whose local fairness deviates from the global.
    Clients report the received global model's group confusion counts on their data
    (`evaluates_global`); the weights are the method's state."""

    name = "fairfed"
    per_client_updates = True
    evaluates_global = True
    needs_groups = True

    class Params(NoParams):
        beta: float = Field(1.0, ge=0, description="fairness budget: how fast weights follow the gap")
        metric: Literal["sp_gap", "tpr_gap"] = Field("sp_gap", description="statistical parity or "
                                                     "equal opportunity")

    def deviations(self, result: RoundResult) -> np.ndarray:
        counts = [counts_from_metrics(c.metrics, prefix="pre_") for c in result.clients]
        if any(c is None for c in counts):
            raise ValueError("fairfed needs a dataset with a sensitive attribute (adult or german)")
        key = self.params.metric
        global_gap = parity_gaps(sum(counts))[key]
        local = np.array([parity_gaps(c)[key] if (c.sum(axis=(1, 2)) > 0).all() else np.nan
                          for c in counts])
        deviation = np.abs(local - global_gap)
        known = np.isfinite(deviation)
        mean = deviation[known].mean() if known.any() else 0.0
        return np.where(known, deviation, mean)

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        if "weights" not in self.state:  # the data shares
            self.state["weights"] = self.run.client_sizes / self.run.client_sizes.sum()
        weights = self.state["weights"]
        ids = np.array([c.client_id for c in result.clients])
        deviation = self.deviations(result)
        updated = np.clip(weights[ids] - self.params.beta * (deviation - deviation.mean()), 0, None)
        if updated.sum() <= 0:  # every weight clipped: fall back to the data shares
            updated = self.run.client_sizes[ids].astype(np.float64)
        weights[ids] = updated / updated.sum() * weights[ids].sum()
        mix = updated / updated.sum()
        new = {}
        for name in current:
            stacked = np.stack([c.outputs["model"][name].astype(np.float64) for c in result.clients])
            new[name] = np.tensordot(mix, stacked, axes=1).astype(current[name].dtype)
        return new, {"fairfed_weight_min": float(mix.min()), "fairfed_weight_max": float(mix.max()),
                     "fairfed_mean_deviation": float(deviation.mean())}
