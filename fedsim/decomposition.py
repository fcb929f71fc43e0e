"""The loss decomposition of a round (FedLD): which of local, shift or aggregation loss hurts.

With clients weighted p_i = n_i / sum_j n_j, F = sum_j p_j F_j (full-data mean losses on the
clients' training data), local models theta_i and the round's aggregate theta_bar:

    F(theta_bar) = sum_i p_i F_i(theta_i)                    local loss
                 + sum_i p_i [F(theta_i) - F_i(theta_i)]     distribution-shift loss
                 + [F(theta_bar) - sum_i p_i F(theta_i)]     aggregation loss
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fedsim.data.federation import Federation
from fedsim.engine.protocol import Arrays, ClientResult
from fedsim.evaluation import evaluate
from fedsim.seeding import derive_seed

DECOMPOSITION_STREAM = 0xDEC0
IDENTITY_TOLERANCE = 1e-5


def decompose(cross_losses: np.ndarray, weights: np.ndarray,
              aggregate_losses: np.ndarray) -> dict[str, float]:
    """The three terms from `cross_losses[i, j]` = F_j(theta_i), the clients' `weights` p (any
    positive scale) and `aggregate_losses[j]` = F_j(theta_bar)."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    cross = np.asarray(cross_losses, dtype=np.float64)
    own = np.diag(cross)  # F_i(theta_i)
    global_of_local = cross @ p  # F(theta_i)
    return {"local": float(p @ own),
            "shift": float(p @ (global_of_local - own)),
            "aggregation": float(p @ np.asarray(aggregate_losses, np.float64) - p @ global_of_local)}


class LossDecomposer:
    """Computes the decomposition each round in the server process, on at most `cap` of the
    round's clients (a seeded sample), and checks the identity against a pooled evaluation."""

    def __init__(self, model: torch.nn.Module, federation: Federation, cap: int, seed: int) -> None:
        self.model = model
        self.federation = federation
        self.cap = cap
        self.seed = seed

    def _losses(self, arrays: Arrays, data: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
        return np.array([evaluate(self.model, x, y)["loss"] for x, y in data])

    def __call__(self, server_round: int, clients: list[ClientResult], aggregate: Arrays) -> dict[str, float]:
        with_models = [c for c in clients if "model" in c.outputs and c.metrics.get("num_examples", 0) > 0]
        if len(with_models) > self.cap:
            rng = np.random.default_rng(derive_seed(self.seed, server_round, DECOMPOSITION_STREAM))
            keep = sorted(rng.choice(len(with_models), self.cap, replace=False))
            with_models = [with_models[i] for i in keep]
        if not with_models:
            return {}
        data = []
        for client in with_models:
            local = self.federation.client_data(client.client_id)
            data.append((torch.as_tensor(local.x_train), torch.as_tensor(local.y_train)))
        sizes = np.array([len(y) for _, y in data], dtype=np.float64)
        cross = np.stack([self._losses(c.outputs["model"], data) for c in with_models])
        aggregate_losses = self._losses(aggregate, data)
        terms = decompose(cross, sizes, aggregate_losses)
        pooled_x, pooled_y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
        pooled = evaluate(self.model, pooled_x, pooled_y)["loss"]
        total = terms["local"] + terms["shift"] + terms["aggregation"]
        error = abs(total - pooled) / max(abs(pooled), 1e-12)
        if error > IDENTITY_TOLERANCE:
            warnings.warn(f"round {server_round}: loss decomposition terms sum to {total:.6g} but the "
                          f"pooled loss is {pooled:.6g} (relative error {error:.1e})", stacklevel=2)
        return {"decomp_local": terms["local"], "decomp_shift": terms["shift"],
                "decomp_aggregation": terms["aggregation"], "decomp_global": pooled,
                "decomp_identity_error": error, "decomp_clients": float(len(with_models))}
