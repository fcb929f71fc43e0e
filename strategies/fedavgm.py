"""FedAvgM (Hsu et al., 2019): server momentum on the averaged update."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from strategies.server_optimizer import ServerOptimizerStrategy


class FedAvgMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class FedAvgM(ServerOptimizerStrategy):
    """v <- momentum * v + delta;  w <- w + server_lr * v  (delta: mean model - global)."""

    name = "fedavgm"
    Params = FedAvgMParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, name: str, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        v = self.params.momentum * self.velocity.get(name, np.zeros_like(delta)) + delta
        self.velocity[name] = v
        return weights + self.params.server_lr * v
