"""Federated adversarial learning (Li et al., ICML 2023): every client trains on adversarial
examples of its own batches, an inner PGD maximization (eps-ball, L-inf or L2) inside the outer
local minimization; the server aggregates with whatever method the run uses. An add-on: its
whole client half is one loss term, so it runs beside any strategy and communicates nothing.

The batch loss becomes  clean_share x CE(clean) + (1 - clean_share) x CE(PGD examples): the
training loop's clean cross-entropy plus this term's (1 - clean_share) x (CE(adv) - CE(clean)).
The PGD start is drawn from a generator seeded per client, round and batch, so a client's
training stays a pure function of its inputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.attacks import pgd
from fedsim.config import FalSection
from fedsim.method import AddOn, Batch, ClientContext, LossTerm
from fedsim.seeding import derive_seed

FAL_STREAM = 0xFA1


class AdversarialLoss(LossTerm):
    """Replaces (1 - clean_share) of the clean cross-entropy by that of PGD examples."""

    name = "adversarial"
    Params = FalSection

    def __init__(self, params: FalSection, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        self.generator = torch.Generator().manual_seed(
            derive_seed(ctx.seed, ctx.server_round, ctx.client_id, FAL_STREAM))

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        p = self.params
        adversarial = pgd(model, batch.inputs, batch.targets, p.eps, p.steps, p.step_for(p.eps), p.norm,
                          p.random_start, p.box, self.generator)
        clean = F.cross_entropy(batch.logits, batch.targets)
        return (1.0 - p.clean_share) * (F.cross_entropy(model(adversarial), batch.targets) - clean)


class Fal(AddOn):
    """PGD adversarial training on every client, beside any method."""

    name = "fal"
    Params = FalSection

    def loss_terms(self, ctx: ClientContext) -> list[LossTerm]:
        return [AdversarialLoss(self.params, ctx)]
