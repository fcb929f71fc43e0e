"""FedRep (Collins et al., 2021): a shared representation, a personal head trained first.

Client: from the global body and its own head (the global head before its first round), it
first trains the head alone for `head_epochs` passes over its data with the body frozen, then
the body alone for the planned local steps (client.local_epochs / local_steps) with the head
frozen; it keeps the head and sends the body. Server: the sample-weighted mean of the bodies.
As in FedPer, the global head is never trained.
"""

import math

from pydantic import Field
from torch import nn

from fedsim.data.tensors import LocalData
from fedsim.method import ClientContext, LossTerm, NoParams
from fedsim.personal import LocalLayers, body_names, head_keys, train_keys
from fedsim.seeding import derive_seed


class FedRep(LocalLayers):
    """Local head trained before the shared body, each with the other frozen."""

    name = "fedrep"

    class Params(NoParams):
        head_epochs: int = Field(10, ge=1, description="passes over the client's data that train "
                                 "the head (body frozen) before the body trains")

    def local_keys(self, model: nn.Module) -> list[str]:
        return head_keys(model)

    def train(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
              steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        head_steps = self.params.head_epochs * math.ceil(len(data.y_train) / ctx.settings.batch_size)
        first = train_keys(ctx, model, data, head_keys(model), derive_seed(seed, 1), head_steps, terms)
        metrics = train_keys(ctx, model, data, body_names(model), seed, steps, terms)
        metrics["head_train_loss"] = first["train_loss"]
        metrics["train_seconds"] += first["train_seconds"]
        return metrics
