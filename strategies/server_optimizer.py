"""Methods that treat the mean client update as a pseudo-gradient for a server optimizer."""

from __future__ import annotations

import numpy as np

from fedsim.method import Arrays, Method, RoundResult


class ServerOptimizer(Method):
    """Applies `step` to the trainable parameters; buffers (e.g. BatchNorm statistics) take the
    plain weighted mean of the clients' values. The optimizer's moments live in `self.state`."""

    def step(self, name: str, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New value of one parameter, given delta = mean client model - current global."""
        raise NotImplementedError

    def moment(self, key: str, name: str, like: np.ndarray, start: float = 0.0) -> np.ndarray:
        """The optimizer moment `key` of parameter `name` (a constant `start` before round 1)."""
        return self.state.get(f"{key}.{name}", np.full_like(like, start))

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        mean = result.means["model"]
        new = dict(mean)
        for name in self.run.param_names:
            w = current[name].astype(np.float64)
            new[name] = self.step(name, w, mean[name].astype(np.float64) - w).astype(current[name].dtype)
        return new, {}
