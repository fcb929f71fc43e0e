"""MOON (Li, He and Song, CVPR 2021): model-contrastive federated learning.

Client: besides cross-entropy, mu * l_con pulls the representation z of the local model toward
that of the global model and away from that of the client's previous local model:
    l_con = -log( exp(cos(z, z_glob) / T) / (exp(cos(z, z_glob) / T) + exp(cos(z, z_prev) / T)) )
The representation is the output of every layer but the last (the model's `features(x)` when it
defines one). The previous local model is the client's state; before its first round the
received global model stands in for it (as in the paper's code, where the pool starts with the
initial model), which makes l_con constant. Server: FedAvg.
The representation takes a second forward pass in training mode, so a model with batch
normalization updates its running statistics twice per step (the paper's code computes the
representation and the logits in one pass).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from fedsim.config import ExperimentConfig
from fedsim.errors import ConfigError
from fedsim.method import Batch, ClientContext, ClientUpdate, LossTerm, Method, NoParams


def representation(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's representation of `x`: `features(x)`, or all layers but the last."""
    if hasattr(model, "features") and callable(model.features):
        return model.features(x).flatten(1)
    if isinstance(model, nn.Sequential):
        return model[:-1](x).flatten(1)
    raise ValueError("moon needs a model that is an nn.Sequential or defines features(x)")


class Representer(nn.Module):
    """`representation` as a module's forward, so a frozen model runs on given weights through
    functional_call (and, in vectorized training, on every client's own weights at once)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return representation(self.model, x)


class MoonParams(NoParams):
    mu: float = Field(1.0, ge=0, description="weight of the model-contrastive loss")
    temperature: float = Field(0.5, gt=0, description="temperature T of the cosine similarities")


class ModelContrast(LossTerm):
    """mu * l_con against the frozen global and previous local models (the previous model's
    weights differ per client: `per_client`)."""

    per_client = ("previous",)

    def __init__(self, params: MoonParams, ctx: ClientContext) -> None:
        super().__init__(params, ctx)
        stored = ctx.store.load("previous")
        device = next(iter(ctx.global_arrays.values())).device
        if "moon-frame" not in ctx.cache:  # any model of the architecture: its weights are replaced
            ctx.cache["moon-frame"] = Representer(ctx.model_factory().eval().requires_grad_(False))
        self.frame = ctx.cache["moon-frame"]
        self.global_weights = {k: v.detach() for k, v in ctx.global_arrays.items()}
        self.previous = self.global_weights if stored is None else {
            k: torch.as_tensor(v, device=device) for k, v in stored.items()}

    def frozen(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The representation of `x` by the frozen model with these weights (a state dict)."""
        return torch.func.functional_call(self.frame, {f"model.{k}": v for k, v in weights.items()}, (x,))

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        z = representation(model, batch.inputs)
        with torch.no_grad():
            z_global = self.frozen(self.global_weights, batch.inputs)
            z_previous = self.frozen(self.previous, batch.inputs)
        t = self.params.temperature
        logits = torch.stack([F.cosine_similarity(z, z_global, dim=1),
                              F.cosine_similarity(z, z_previous, dim=1)], dim=1) / t
        positive = torch.zeros(len(z), dtype=torch.long, device=z.device)
        if batch.weights is None:
            return self.params.mu * F.cross_entropy(logits, positive)
        return self.params.mu * (F.cross_entropy(logits, positive, reduction="none") * batch.weights).sum()


class Moon(Method):
    """FedAvg on the server; model-contrastive local training, previous model kept per client."""

    name = "moon"
    Params = MoonParams

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        if config.model.name == "logreg":
            raise ConfigError("moon contrasts representations, and logistic regression has none "
                              "(its layers but the last hold no parameters): use model.name = "
                              "'mlp' or 'cnn'")

    def loss_terms(self, ctx: ClientContext) -> list[LossTerm]:
        return [ModelContrast(self.params, ctx)]

    @torch.no_grad()
    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        ctx.store.save("previous", {k: v.cpu().numpy().copy() for k, v in model.state_dict().items()})
        return ClientUpdate()
