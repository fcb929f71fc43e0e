"""SCAFFOLD (Karimireddy et al., 2020): control variates correct the clients' drift.

Server: a control variate c per trainable parameter, sent with every training message; the model
moves by server_lr times the mean update, c by |S|/N times the mean control change.
Client: each gradient is corrected by (c - c_i), i.e. <c - c_i, w> is added to the loss; after K
local steps with learning rate lr the client control is updated with option II of the paper,
c_i+ = c_i - c + (w_global - w) / (K lr), kept as the client's state, and c_i+ - c_i is sent back.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedsim.method import (
    Arrays,
    Batch,
    ClientContext,
    ClientUpdate,
    LossTerm,
    Method,
    NoParams,
    RoundResult,
)


def own_control(ctx: ClientContext) -> dict[str, torch.Tensor]:
    """The client's control variate c_i (zero before its first round)."""
    stored = ctx.store.load("control")
    return {n: torch.as_tensor(stored[n], device=c.device) if stored else torch.zeros_like(c)
            for n, c in ctx.broadcast.items()}


class ControlCorrection(LossTerm):
    """<c - c_i, w> over the trainable parameters: its gradient is the correction c - c_i."""

    per_client = ("correction",)

    def __init__(self, params: NoParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        own = own_control(ctx)
        self.correction = {n: ctx.broadcast[n] - own[n] for n in own}

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return sum((p * self.correction[n]).sum() for n, p in model.named_parameters())


class Scaffold(Method):
    """Drift correction by server and client control variates (option II control update)."""

    name = "scaffold"
    outputs = {"model": "examples", "control_delta": "uniform"}

    class Params(NoParams):
        server_lr: float = Field(1.0, gt=0, description="eta_g")

    # ---- server half -----------------------------------------------------------------------
    def broadcast(self, server_round: int, current: Arrays) -> Arrays:
        if not self.state:
            self.state = {n: np.zeros_like(current[n]) for n in self.run.param_names}
        return dict(self.state)

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        mean, delta_c = result.means["model"], result.means["control_delta"]
        share = len(result.clients) / self.run.num_clients
        for name in self.run.param_names:
            self.state[name] = (self.state[name] + share * delta_c[name]).astype(self.state[name].dtype)
        new = dict(mean)
        for name in self.run.param_names:
            step = self.params.server_lr * (mean[name].astype(np.float64) - current[name])
            new[name] = (current[name] + step).astype(current[name].dtype)
        return new, {}

    # ---- client half -----------------------------------------------------------------------
    def loss_terms(self, ctx: ClientContext) -> list[LossTerm]:
        return [ControlCorrection(NoParams(), ctx)]

    @torch.no_grad()
    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        own, server = own_control(ctx), ctx.broadcast
        params = dict(model.named_parameters())
        new = {n: own[n] - server[n] + (ctx.global_arrays[n] - params[n]) / (ctx.steps * ctx.lr)
               for n in server}
        ctx.store.save("control", {n: t.cpu().numpy() for n, t in new.items()})
        return ClientUpdate({"control_delta": {n: (new[n] - own[n]).cpu().numpy() for n in new}})
