"""q-FFL (Li et al., ICLR 2020): fair resource allocation by reweighting clients with high loss.

With L = 1 / lr (the Lipschitz estimate of the paper's q-FedSGD/q-FedAvg), client k reports the
loss F_k of the received global model w on its data and its update; the server computes

    Delta_k = F_k^q * L * (w - w_k),   h_k = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q,
    w <- w - sum_k Delta_k / sum_k h_k.

q = 0 is plain averaging of the updates (with equal client weights); larger q favours the
clients the model serves worst.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedsim.method import Arrays, Method, NoParams, RoundResult


class QFFL(Method):
    """q-FedAvg: client updates weighted by their loss to the power q, with the paper's step size.
    Clients report the received global model's loss on their data (`evaluates_global`)."""

    name = "qffl"
    per_client_updates = True
    evaluates_global = True

    class Params(NoParams):
        q: float = Field(1.0, ge=0, description="fairness: 0 is averaging, larger favours worse clients")

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        q, lipschitz = self.params.q, 1.0 / self.run.settings.lr
        names = [n for n in current if np.issubdtype(current[n].dtype, np.floating)]
        numerator = {n: np.zeros(current[n].shape) for n in names}
        denominator = 0.0
        for client in result.clients:
            loss = max(client.metrics["global_train_loss"], 1e-10)
            gaps = {n: lipschitz * (current[n].astype(np.float64) - client.outputs["model"][n])
                    for n in names}
            squared = sum(float((g**2).sum()) for g in gaps.values())
            for n in names:
                numerator[n] += loss**q * gaps[n]
            denominator += (q * loss ** (q - 1) * squared if q > 0 else 0.0) + lipschitz * loss**q
        new = dict(result.means["model"])  # integer buffers: the FedAvg mean
        for n in names:
            new[n] = (current[n] - numerator[n] / denominator).astype(current[n].dtype)
        return new, {}
