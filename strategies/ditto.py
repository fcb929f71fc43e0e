"""Ditto (Li, Hu, Beirami and Smith, ICML 2021): a personal model regularized toward the global.

Client: trains the global model as FedAvg does and sends it; then it trains its personal
model v (kept in its store; the received global model before its first round) for the same
number of local steps on F_k(v) + (lambda / 2) ||v - w||^2, with w the global model it received.
Server: FedAvg. The personal model is v.
"""

from pydantic import Field
from torch import nn

from clients.training import train_locally
from fedsim.data.tensors import LocalData
from fedsim.method import ClientContext, LossTerm, Method, NoParams
from fedsim.personal import arrays_of, load_arrays
from fedsim.seeding import derive_seed
from fedsim.terms import Proximal

PERSONAL_STREAM = 3  # the seed stream of the personal model's batches


class Ditto(Method):
    """FedAvg for the global model, a proximally regularized personal model per client."""

    name = "ditto"

    class Params(NoParams):
        lam: float = Field(0.1, ge=0, description="lambda: how strongly the personal model is pulled "
                           "toward the global model")

    def local_training(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
                       steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        metrics = train_locally(model, data, ctx.settings, terms, seed, ctx.lr, steps=steps)
        if "ditto-frame" not in ctx.cache:  # any model of the architecture: its weights are replaced
            ctx.cache["ditto-frame"] = ctx.model_factory()
        personal = ctx.cache["ditto-frame"]
        stored = ctx.store.load("personal")
        load_arrays(personal, stored if stored is not None else ctx.global_arrays)
        pull = Proximal(Proximal.Params(mu=self.params.lam), ctx)
        own = train_locally(personal, data, ctx.settings, [*terms, pull],
                            derive_seed(seed, PERSONAL_STREAM), ctx.lr, steps=steps)
        ctx.store.save("personal", arrays_of(personal))
        metrics["personal_train_loss"] = own["train_loss"]
        metrics["train_seconds"] += own["train_seconds"]
        return metrics

    def personal_model(self, ctx: ClientContext, model: nn.Module, data: LocalData) -> bool:
        stored = ctx.store.load("personal")
        if stored is not None:
            load_arrays(model, stored)
        return stored is not None
