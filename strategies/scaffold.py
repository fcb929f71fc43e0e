"""SCAFFOLD (Karimireddy et al., 2020): control variates correct the clients' drift.

Server: a control variate c per trainable parameter, sent with every training message; the model
moves by server_lr times the mean update, c by |S|/N times the mean control change.
Client: every local step also moves by -lr (c - c_i); after K local steps with learning rate lr
the client control is updated with option II of the paper, c_i+ = c_i - c + (w_global - w) / (K lr),
kept as the client's state, and c_i+ - c_i is sent back.

Where the correction goes (`correction`): the paper's clients run plain SGD, where both choices
are one update. With momentum they differ. "after_step" (the default) moves the weights by
-lr (c - c_i) after the optimizer's update, outside momentum, as NIID-Bench
(Xtra-Computing/NIID-Bench experiments.py, train_net_scaffold) and Flower's baseline
(baselines/niid_bench, ScaffoldOptimizer.step_custom) do; there (w_global - w) / (K lr) measures
the gradient amplified by momentum, 1 / (1 - momentum) times, and so does the correction.
"gradient" adds <c - c_i, w> to the loss, so momentum amplifies the correction a second time,
1 / (1 - momentum)^2 against the gradient's 1 / (1 - momentum): at NIID-Bench's setting
(momentum 0.9, Fashion-MNIST, Dirichlet 0.5) the run diverges in round 3.
"""

from __future__ import annotations

from typing import Literal

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
    StepShift,
)


def own_control(ctx: ClientContext) -> dict[str, torch.Tensor]:
    """The client's control variate c_i (zero before its first round)."""
    stored = ctx.store.load("control")
    return {n: torch.as_tensor(stored[n], device=c.device) if stored else torch.zeros_like(c)
            for n, c in ctx.broadcast.items()}


def correction(ctx: ClientContext) -> dict[str, torch.Tensor]:
    """c - c_i per trainable parameter."""
    own = own_control(ctx)
    return {n: ctx.broadcast[n] - own[n] for n in own}


class ControlStep(StepShift):
    """Every local step moves by -lr (c - c_i) after the optimizer's update."""

    def __init__(self, params: NoParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.shift = correction(ctx)


class ControlGradient(LossTerm):
    """<c - c_i, w> over the trainable parameters: its gradient is the correction c - c_i."""

    per_client = ("correction",)

    def __init__(self, params: NoParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.correction = correction(ctx)

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return sum((p * self.correction[n]).sum() for n, p in model.named_parameters())


class Scaffold(Method):
    """Drift correction by server and client control variates (option II control update)."""

    name = "scaffold"
    outputs = {"model": "examples", "control_delta": "uniform"}

    class Params(NoParams):
        server_lr: float = Field(1.0, gt=0, description="eta_g")
        correction: Literal["after_step", "gradient"] = Field(
            "after_step", description="after_step: -lr (c - c_i) after each optimizer update, outside "
            "momentum (the reference code); gradient: added to the gradient, through momentum")

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
        term = ControlStep if self.params.correction == "after_step" else ControlGradient
        return [term(NoParams(), ctx)]

    @torch.no_grad()
    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        own, server = own_control(ctx), ctx.broadcast
        params = dict(model.named_parameters())
        new = {n: own[n] - server[n] + (ctx.global_arrays[n] - params[n]) / (ctx.steps * ctx.lr)
               for n in server}
        ctx.store.save("control", {n: t.cpu().numpy() for n, t in new.items()})
        return ClientUpdate({"control_delta": {n: (new[n] - own[n]).cpu().numpy() for n in new}})
