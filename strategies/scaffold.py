"""SCAFFOLD (Karimireddy et al., 2020): control variates correct the clients' drift."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedsim.engine.protocol import Arrays
from strategies.base import FedsimStrategy, RoundResult


class ScaffoldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0, description="eta_g")


class Scaffold(FedsimStrategy):
    """Clients follow gradients corrected by (c - c_i) (option II control update, kept per
    client in the client-state store); the server moves the model by server_lr times the mean
    update and the control by |S|/N times the mean control change."""

    name = "scaffold"
    Params = ScaffoldParams
    outputs = {"model": "examples", "control_delta": "uniform"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.control: Arrays = {}

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {"objectives": {"scaffold": {}}}

    def broadcast(self, server_round: int) -> Arrays:
        if not self.control:
            self.control = {n: np.zeros_like(self.current[n]) for n in self.param_names}
        return {f"control.{n}": c for n, c in self.control.items()}

    def aggregate(self, server_round: int, current: Arrays, result: RoundResult) -> Arrays:
        mean, delta_c = result.means["model"], result.means["control_delta"]
        share = len(result.clients) / self.num_clients
        for name in self.param_names:
            self.control[name] = (self.control[name] + share * delta_c[name]).astype(
                self.control[name].dtype)
        new = dict(mean)
        for name in self.param_names:
            step = self.params.server_lr * (mean[name].astype(np.float64) - current[name])
            new[name] = (current[name] + step).astype(current[name].dtype)
        return new
