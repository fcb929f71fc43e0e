"""FedAvgM (Hsu et al., 2019): server momentum on the averaged update."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedsim.method import NoParams
from strategies.server_optimizer import ServerOptimizer


class FedAvgM(ServerOptimizer):
    """v <- momentum * v + delta;  w <- w + server_lr * v  (delta: mean model - global)."""

    name = "fedavgm"

    class Params(NoParams):
        server_lr: float = Field(1.0, gt=0)
        momentum: float = Field(0.9, ge=0, lt=1)

    def step(self, name: str, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        v = self.params.momentum * self.moment("velocity", name, delta) + delta
        self.state[f"velocity.{name}"] = v
        return weights + self.params.server_lr * v
