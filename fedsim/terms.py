"""Loss terms any method may use, and `client.objectives` may add to any run by name."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

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
        _, group1, group0, both = positive_rate_by_group(batch, "parity")
        gap = group1 - group0
        return torch.where(both, self.params.mu * gap.abs(), torch.zeros_like(gap))


class BalancedSoftmax(LossTerm):
    """Balanced softmax (Ren et al., 2020), the logit-adjusted loss of Menon et al. (2021) with
    the client's own label shares pi as the prior: cross-entropy of logits + tau log pi. The
    loop already adds the plain cross-entropy, so the term is the difference of the two (per
    row, weighted as the batch's mean). A class the client lacks gets log pi = log 1e-12."""

    name = "balanced_softmax"
    per_client = ("prior",)

    class Params(NoParams):
        tau: float = Field(1.0, ge=0, description="weight of the log prior added to the logits")

    def __init__(self, params: NoParams, ctx) -> None:
        super().__init__(params, ctx)
        if ctx.labels is None:
            raise ValueError("balanced_softmax needs the client's training labels")
        counts = torch.bincount(ctx.labels, minlength=ctx.num_classes).double()
        shares = counts / counts.sum().clamp(min=1)
        self.prior = {"log_prior": torch.log(shares.clamp(min=1e-12)).float()}

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        adjusted = batch.logits + self.params.tau * self.prior["log_prior"]
        per_row = (F.cross_entropy(adjusted, batch.targets, reduction="none")
                   - F.cross_entropy(batch.logits, batch.targets, reduction="none"))
        return per_row.mean() if batch.weights is None else (per_row * batch.weights).sum()


def positive_rate_by_group(batch: Batch, term: str, squash: bool = False):
    """The batch's softmax probability of the positive class per real row (sigmoid'ed again with
    `squash`), its mean over group 1 and over group 0, and whether both groups are in the batch;
    branch-free, so it runs inside vectorized training."""
    if batch.groups is None:
        raise ValueError(f"the {term} term needs a dataset with a sensitive attribute")
    positive = torch.softmax(batch.logits, dim=1)[:, 1]
    if squash:
        positive = torch.sigmoid(positive)
    real = torch.ones_like(positive) if batch.weights is None else (batch.weights > 0).to(positive.dtype)
    ones, zeros = (batch.groups == 1) * real, (batch.groups == 0) * real
    count1, count0 = ones.sum(), zeros.sum()
    mean1 = (positive * ones).sum() / count1.clamp(min=1)
    mean0 = (positive * zeros).sum() / count0.clamp(min=1)
    return positive * real, mean1, mean0, (count1 > 0) & (count0 > 0)


class ParityConstraint(LossTerm):
    """The PID fairness paper's local penalty: fairtorch's demographic-parity constraint loss
    (wbawakate/fairtorch `fairtorch/constraint.py` at 8a4473a, used with alpha 100 and weight 2
    in FaisalHamman/FairFL-PID `FedAvg/client.py` L107-110). With m_0 and m_1 the batch's mean
    positive probability in group 0 and 1 and m their mean over the batch, its constraint matrix
    compares m_0 with m in both directions, twice:

        weight * alpha * 2 * (m_0 - m)^2  =  weight * alpha * 2 * pi_1^2 * (m_0 - m_1)^2

    (pi_1: group 1's share of the batch), zero for a batch missing a group. The reference feeds
    sigmoid outputs through fairtorch's own sigmoid; `squash = true` does the same to the
    softmax probability."""

    name = "parity_constraint"
    needs_groups = True
    per_client = ()

    class Params(NoParams):
        alpha: float = Field(100.0, ge=0, description="fairtorch's constraint weight")
        weight: float = Field(2.0, ge=0, description="the term's weight in the loss")
        squash: bool = Field(False, description="sigmoid the probability again (the reference)")

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        positive, _, group0, both = positive_rate_by_group(batch, "parity_constraint", self.params.squash)
        count = positive.new_tensor(len(positive)) if batch.weights is None else (batch.weights > 0).sum()
        overall = positive.sum() / count.clamp(min=1)
        violation = group0 - overall
        loss = self.params.weight * self.params.alpha * 2 * violation ** 2
        return torch.where(both, loss, torch.zeros_like(loss))
