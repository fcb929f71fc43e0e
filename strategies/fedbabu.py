"""FedBABU (Oh, Kim and Yun, ICLR 2022): train the body under a frozen random head, fine-tune
at evaluation.

Client: trains every parameter but the head (the model's last nn.Linear), which keeps its random
initial weights in every client and round, and sends the body. Server: the sample-weighted mean
of the bodies; the global model is that body with the initial head. Personal model: the global
model fine-tuned on the client's training data for `finetune_epochs` passes (the whole model by
default, as the paper's evaluation does; `finetune = "head"` tunes only the head), so no
personal parameters outlive a round.
"""

import math
from typing import Literal

from pydantic import Field
from torch import nn

from fedsim.data.tensors import LocalData
from fedsim.method import Arrays, ClientContext, ClientUpdate, LossTerm, Method, NoParams, RoundResult
from fedsim.personal import arrays_of, head_keys, train_keys
from fedsim.seeding import derive_seed

FINETUNE_STREAM = 2  # the seed stream of the evaluation-time fine-tuning


class FedBABU(Method):
    """Body trained federatedly under a fixed random head; personal by fine-tuning."""

    name = "fedbabu"

    class Params(NoParams):
        finetune_epochs: int = Field(5, ge=0, description="passes over the client's training data "
                                     "that fine-tune the global model into its personal model")
        finetune: Literal["all", "head"] = Field("all", description="what the fine-tuning trains")

    def local_training(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
                       steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        head = set(head_keys(model))
        body = [name for name, _ in model.named_parameters() if name not in head]
        return train_keys(ctx, model, data, body, seed, steps, terms)

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        head = set(head_keys(model))
        return ClientUpdate(outputs={"model": {k: v for k, v in arrays_of(model).items() if k not in head}})

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        return {**current, **result.means["model"]}, {}

    def personal_model(self, ctx: ClientContext, model: nn.Module, data: LocalData) -> None:
        if not self.params.finetune_epochs or not len(data.y_train):
            return
        keys = (head_keys(model) if self.params.finetune == "head"
                else [name for name, _ in model.named_parameters()])
        steps = self.params.finetune_epochs * math.ceil(len(data.y_train) / ctx.settings.batch_size)
        seed = derive_seed(ctx.seed, ctx.server_round, ctx.client_id, FINETUNE_STREAM)
        train_keys(ctx, model, data, keys, seed, steps, [])
