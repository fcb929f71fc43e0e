"""Loss terms any method may use, and `client.objectives` may add to any run by name."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedsim.method import Batch, LossTerm, NoParams


class Proximal(LossTerm):
    """FedProx: (mu / 2) * ||w - w_global||^2 over the trainable parameters."""

    name = "proximal"
    per_client = ()  # its anchor is the global model, the same for every client

    class Params(NoParams):
        mu: float = Field(0.01, ge=0, description="weight of the proximal term")

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        anchor = self.ctx.global_arrays
        squared = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
        return 0.5 * self.params.mu * squared


class ParityPenalty(LossTerm):
    """A differentiable statistical-parity penalty: mu * |mean P(yhat=1) over group 1 - over
    group 0| in the batch, from the softmax of the positive class (zero for a batch missing a
    group). Needs a dataset with a sensitive attribute (checked before the run starts). Written
    without data-dependent branches, so it also runs inside vectorized training."""

    name = "parity"
    needs_groups = True
    per_client = ()

    class Params(NoParams):
        mu: float = Field(1.0, ge=0, description="weight of the parity gap")

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if batch.groups is None:
            raise ValueError("the parity penalty needs a dataset with a sensitive attribute")
        positive = torch.softmax(batch.logits, dim=1)[:, 1]
        real = torch.ones_like(positive) if batch.weights is None else (batch.weights > 0).to(positive.dtype)
        ones, zeros = (batch.groups == 1) * real, (batch.groups == 0) * real
        count1, count0 = ones.sum(), zeros.sum()
        gap = (positive * ones).sum() / count1.clamp(min=1) - (positive * zeros).sum() / count0.clamp(min=1)
        both = (count1 > 0) & (count0 > 0)
        return torch.where(both, self.params.mu * gap.abs(), torch.zeros_like(gap))
