"""FedAdam and FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization")."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedsim.method import NoParams
from strategies.server_optimizer import ServerOptimizer


class FedAdam(ServerOptimizer):
    """m <- b1 m + (1-b1) d;  v <- b2 v + (1-b2) d^2;  w <- w + eta m / (sqrt(v) + tau)."""

    name = "fedadam"

    class Params(NoParams):
        server_lr: float = Field(0.01, gt=0, description="eta")
        beta1: float = Field(0.9, ge=0, lt=1)
        beta2: float = Field(0.99, ge=0, lt=1)
        tau: float = Field(1e-3, gt=0, description="adaptivity; v starts at tau^2")

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.params.beta2 * v + (1 - self.params.beta2) * delta**2

    def step(self, name: str, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        p = self.params
        m = p.beta1 * self.moment("m", name, delta) + (1 - p.beta1) * delta
        v = self.second_moment(self.moment("v", name, delta, p.tau**2), delta)
        self.state[f"m.{name}"], self.state[f"v.{name}"] = m, v
        return weights + p.server_lr * m / (np.sqrt(v) + p.tau)


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment: v <- v - (1-b2) d^2 sign(v - d^2)."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        return v - (1 - self.params.beta2) * squared * np.sign(v - squared)
