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
from fedsim.personal import body_names, head_keys, train_keys, with_means, without_head
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
        return train_keys(ctx, model, data, body_names(model), seed, steps, terms)

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        return ClientUpdate(outputs={"model": without_head(model)})

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        return with_means(current, result), {}

    def personal_model(self, ctx: ClientContext, model: nn.Module, data: LocalData) -> bool:
        """The global model fine-tuned on the client's training data (the same batches every
        time: the seed depends on the client only)."""
        if self.params.finetune_epochs and len(data.y_train):
            keys = (head_keys(model) if self.params.finetune == "head"
                    else [name for name, _ in model.named_parameters()])
            steps = self.params.finetune_epochs * math.ceil(len(data.y_train) / ctx.settings.batch_size)
            train_keys(ctx, model, data, keys, derive_seed(ctx.seed, ctx.client_id, FINETUNE_STREAM),
                       steps, [])
        return True
