"""FedNova (Wang et al., NeurIPS 2020): normalized averaging removes the objective inconsistency
of clients that take different numbers of local steps.

Client i, after tau_i local SGD steps with momentum rho, sends its normalized update
d_i = (w_global - w_i) / a_i with a_i = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)
(a_i = tau_i without momentum). Server, with data shares p_i:
    w <- w_global - tau_eff * sum_i p_i d_i,    tau_eff = sum_i p_i a_i.
Equal tau_i without momentum gives FedAvg exactly. Buffers take the FedAvg mean.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsim.config import ExperimentConfig
from fedsim.errors import ConfigError
from fedsim.method import Arrays, ClientContext, ClientUpdate, Method, RoundResult


def normalizing_factor(steps: int, momentum: float) -> float:
    """a_i: the norm of client i's accumulated gradient coefficients for SGD with momentum."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(Method):
    """Normalized averaging: each client's update divided by its own step count, rescaled by
    the cohort's effective step count."""

    name = "fednova"
    outputs = {"model": "examples", "normalized": "examples"}

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """a_i is derived for SGD (with momentum) on the plain loss."""
        if config.client.optimizer != "sgd":
            raise ConfigError(f"fednova normalizes SGD updates; client.optimizer = "
                              f"'{config.client.optimizer}' is not supported (use 'sgd')")
        if "proximal" in config.client.objectives:
            raise ConfigError("fednova's a_i assumes no proximal term: remove "
                              "client.objectives.proximal")

    # ---- client half -----------------------------------------------------------------------
    @torch.no_grad()
    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        a = normalizing_factor(ctx.steps, ctx.settings.momentum)
        normalized = {n: ((ctx.global_arrays[n] - p) / a).cpu().numpy()
                      for n, p in model.named_parameters()}
        return ClientUpdate({"normalized": normalized}, {"fednova_a": a})

    # ---- server half -----------------------------------------------------------------------
    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        tau_eff = result.weighted_metric("fednova_a")
        direction = result.means["normalized"]
        new = dict(result.means["model"])  # buffers: the FedAvg mean
        for name in self.run.param_names:
            step = tau_eff * direction[name].astype(np.float64)
            new[name] = (current[name] - step).astype(current[name].dtype)
        return new, {"fednova_tau_eff": tau_eff}
