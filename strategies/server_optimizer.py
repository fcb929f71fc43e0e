"""Strategies that treat the mean client update as a pseudo-gradient for a server optimizer."""

from __future__ import annotations

import numpy as np

from fedsim.engine.protocol import Arrays
from strategies.base import FedsimStrategy, RoundResult


class ServerOptimizerStrategy(FedsimStrategy):
    """Applies `step` to the trainable parameters; buffers (e.g. BatchNorm statistics) take the
    plain weighted mean of the clients' values."""

    def step(self, name: str, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New value of one parameter, given delta = mean client model - current global."""
        raise NotImplementedError

    def aggregate(self, server_round: int, current: Arrays, result: RoundResult) -> Arrays:
        mean = result.means["model"]
        new = dict(mean)
        for name in self.param_names:
            w = current[name].astype(np.float64)
            new[name] = self.step(name, w, mean[name].astype(np.float64) - w).astype(current[name].dtype)
        return new
