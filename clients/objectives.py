"""Local objective terms added to the cross-entropy loss; a strategy switches them on by name.

A strategy sends `{"objectives": {"proximal": {"mu": 0.01}}}` in a client's config; each term
adds a penalty to every batch's loss (given the model, the batch's logits, labels and, when the
data have them, sensitive groups) and may return extra outputs once training is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.state import StateStore

Arrays = dict[str, np.ndarray]


@dataclass
class ObjectiveContext:
    """What a term may use: the round's global weights, broadcast arrays, the client's store."""

    client_id: int
    global_params: dict[str, torch.Tensor]
    broadcast: dict[str, torch.Tensor]
    store: StateStore


class Objective:
    """A local loss term. Subclasses override `penalty` and, if they report something, `finish`."""

    def penalty(self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, model: nn.Module, steps: int, lr: float) -> dict[str, Arrays]:
        return {}


class Proximal(Objective):
    """FedProx: (mu / 2) * ||w - w_global||^2 over the trainable parameters."""

    def __init__(self, ctx: ObjectiveContext, mu: float) -> None:
        self.mu = mu
        self.anchor = ctx.global_params

    def penalty(self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        squared = sum(((p - self.anchor[n]) ** 2).sum() for n, p in model.named_parameters())
        return 0.5 * self.mu * squared


class ControlVariates(Objective):
    """SCAFFOLD: corrects each gradient by (c - c_i), i.e. adds <c - c_i, w> to the loss.

    After K local steps with learning rate lr, the client control is updated with option II of
    the paper, c_i+ = c_i - c + (w_global - w) / (K lr), stored per client, and the change
    c_i+ - c_i is reported as the output "control_delta".
    """

    STATE = "scaffold_control"

    def __init__(self, ctx: ObjectiveContext) -> None:
        self.ctx = ctx
        self.server = {n[len("control."):]: t for n, t in ctx.broadcast.items()
                       if n.startswith("control.")}
        stored = ctx.store.load(ctx.client_id, self.STATE)
        self.own = {n: torch.as_tensor(stored[n], device=t.device) if stored else torch.zeros_like(t)
                    for n, t in self.server.items()}
        self.correction = {n: self.server[n] - self.own[n] for n in self.server}

    def penalty(self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        return sum((p * self.correction[n]).sum() for n, p in model.named_parameters())

    @torch.no_grad()
    def finish(self, model: nn.Module, steps: int, lr: float) -> dict[str, Arrays]:
        params = dict(model.named_parameters())
        new = {n: self.own[n] - self.server[n] + (self.ctx.global_params[n] - params[n]) / (steps * lr)
               for n in self.server}
        self.ctx.store.save(self.ctx.client_id, self.STATE, {n: t.cpu().numpy() for n, t in new.items()})
        return {"control_delta": {n: (new[n] - self.own[n]).cpu().numpy() for n in new}}


class MarginControl(Objective):
    """FedLD's margin control: lam * log(1 + ||softmax(logits)||_F^2) over the whole batch.

    The Frobenius norm of the batch's probability matrix is smallest for uniform predictions, so
    the term penalizes over-confident local models.
    """

    def __init__(self, ctx: ObjectiveContext, lam: float) -> None:
        self.lam = lam

    def penalty(self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        squared_norm = torch.softmax(logits, dim=1).pow(2).sum()
        return self.lam * torch.log1p(squared_norm)


class ParityPenalty(Objective):
    """A differentiable statistical-parity penalty: mu * |mean P(yhat=1) over group 1 - over group 0|
    in the batch, from the softmax of the positive class (zero for a batch missing a group)."""

    def __init__(self, ctx: ObjectiveContext, mu: float) -> None:
        self.mu = mu

    def penalty(self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        if groups is None:
            raise ValueError("the parity penalty needs a dataset with a sensitive attribute")
        positive = torch.softmax(logits, dim=1)[:, 1]
        ones, zeros = groups == 1, groups == 0
        if not ones.any() or not zeros.any():
            return logits.new_zeros(())
        return self.mu * (positive[ones].mean() - positive[zeros].mean()).abs()


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "margin": MarginControl,
    "parity": ParityPenalty,
    "proximal": Proximal,
    "scaffold": ControlVariates,
}


def build_objectives(spec: dict[str, dict[str, Any]], ctx: ObjectiveContext) -> list[Objective]:
    """Instantiate the terms named in `spec` (name -> keyword parameters)."""
    unknown = sorted(set(spec) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown local objective(s) {unknown}; known: {sorted(OBJECTIVES)}")
    return [OBJECTIVES[name](ctx, **params) for name, params in spec.items()]
