"""FedLoGe (Xiao et al., ICLR 2024): joint local and generic FL under long-tailed data.

The model's last nn.Linear is its head; everything before it is the shared backbone, whose
output is the feature vector f.

- SSE-C: a static sparse equiangular-tight-frame classifier. The simplex ETF of K classes in d
  dimensions is M = sqrt(K / (K-1)) P (I - 11^T / K), with P a d x K orthonormal basis (QR of a
  uniform random matrix). A random `sparsity` share of its entries is zeroed, then the nonzero
  entries are refined for `etf_steps` Adam steps (lr 1e-4) on
  sum_k (||w_k|| - etf_norm)^2 - mean_k arccos(max_{j != k} cos(w_k, w_j)),
  which brings the class vectors back to equal norms and near-equal angles with the zeros kept.
  It is built once on the server from the seed and never trained.
- Client: each batch trains the backbone on CE(SSE-C(f), y), and, on the detached features,
  an auxiliary global head g (CE(g(f), y)) and the client's own local head l (CE(l(f), y)),
  one SGD step on the sum (the parameter sets are disjoint, so this is the code's three steps
  on one batch's features; the round's `train_loss` is that sum of three cross-entropies).
  It sends the backbone and g, and keeps l.
- Server: the sample-weighted means of the backbones and of g.
- GLA-FR, generic model: g's rows realigned to one norm, W_c = realign_scale * g_c / ||g_c||,
  with g's bias. The global model's head holds this realigned head, so the central evaluation
  is FedLoGe's generic model.
- Personal model: logits l(f) + g~(f), where g~_c = g_c * ||l_c|| (the local head's row norms
  transferred onto g, g's bias kept), with the classes absent from the client's training data
  masked out. Both heads are linear, so this is one head on the backbone.

Choices where the paper's code and fedsim differ or the paper is silent: the code masks the
classes absent from the client's local test distribution (sampled in proportion to its training
counts), fedsim those absent from its training data, so no test label informs a prediction; the
code's SSE-C keeps PyTorch's random initial bias (never trained), fedsim's has none; local heads
start from a seeded random init per client; the code's scale 1.7, target norm 0.1 and sparsity
0.6 are the defaults.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from clients.training import train_locally
from fedsim.config import ExperimentConfig
from fedsim.data.tensors import LocalData
from fedsim.errors import ConfigError
from fedsim.method import (
    Arrays,
    Batch,
    ClientContext,
    ClientUpdate,
    LossTerm,
    Method,
    NoParams,
    RoundResult,
)
from fedsim.personal import arrays_of, head_keys, load_arrays, with_means, without_head
from fedsim.seeding import derive_seed

SSE_STREAM, LOCAL_HEAD_STREAM = 4, 5  # seed streams of the SSE-C and of the clients' first local heads
ETF_LR = 1e-4  # the SSE-C refinement's Adam step size (the paper's code)
MASKED_LOGIT = -30.0  # a masked class's personal logit (the code's -1e10 weights): never predicted
# while a present class scores above it, and a test example of it costs a finite loss


def simplex_etf(classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """The simplex ETF, one unit-norm row per class (classes x dim): pairwise cosines -1/(K-1)."""
    if dim < classes:
        raise ConfigError(f"fedloge: the model's feature dimension ({dim}) must be at least the "
                          f"number of classes ({classes}) for an equiangular tight frame; use a "
                          "wider last hidden layer (model.hidden)")
    basis, _ = torch.linalg.qr(torch.rand(dim, classes, generator=generator, dtype=torch.float64))
    centre = torch.eye(classes, dtype=torch.float64) - 1.0 / classes
    return (math.sqrt(classes / (classes - 1)) * basis @ centre).T


def sparse_etf(classes: int, dim: int, sparsity: float, norm: float, steps: int,
               seed: int) -> torch.Tensor:
    """SSE-C's weights (classes x dim): a simplex ETF with a random `sparsity` share of entries
    zeroed, its nonzero entries refined toward rows of norm `norm` at the widest nearest-neighbour
    angles (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    weights = simplex_etf(classes, dim, generator).float()
    mask = torch.ones(classes * dim)
    mask[torch.randperm(classes * dim, generator=generator)[:int(sparsity * classes * dim)]] = 0.0
    mask = mask.view(classes, dim)
    weights = (weights * mask).requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=ETF_LR)
    others = ~torch.eye(classes, dtype=torch.bool)
    for _ in range(steps):
        cosines = F.normalize(weights, dim=1) @ F.normalize(weights, dim=1).T
        nearest = cosines.masked_select(others).view(classes, classes - 1).max(dim=1).values
        loss = ((weights.norm(dim=1) - norm) ** 2).sum() - torch.arccos(
            nearest.clamp(-0.99999, 0.99999)).mean()
        optimizer.zero_grad()
        loss.backward()
        weights.grad *= mask
        optimizer.step()
    return weights.detach()


class LoGeNet(nn.Module):
    """The backbone with SSE-C as its classifier (frozen), beside the auxiliary global head and
    the client's local head; the forward pass keeps the features for `HeadLosses`."""

    def __init__(self, backbone: nn.Module, sse: torch.Tensor, aux: nn.Linear, local: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.aux, self.local = backbone, aux, local
        self.register_buffer("sse", sse)
        self.features = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = self.backbone(x).flatten(1)
        return self.features @ self.sse.T


class HeadLosses(LossTerm):
    """Cross-entropy of the auxiliary global head and of the local head on the batch's detached
    features (their gradients reach only the two heads)."""

    def penalty(self, model: LoGeNet, batch: Batch) -> torch.Tensor:
        features = model.features.detach()
        return (F.cross_entropy(model.aux(features), batch.targets)
                + F.cross_entropy(model.local(features), batch.targets))


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding copies of these weights."""
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


class FedLoGe(Method):
    """SSE-C on a shared backbone, a federated auxiliary head realigned into the generic model,
    and local heads with the auxiliary head's norm-transferred rows as personal models."""

    name = "fedloge"
    outputs = {"model": "examples", "aux": "examples"}

    class Params(NoParams):
        sparsity: float = Field(0.6, ge=0, lt=1, description="share of SSE-C's entries set to zero")
        etf_norm: float = Field(0.1, gt=0, description="the norm SSE-C's class vectors are refined to")
        etf_steps: int = Field(10000, ge=0, description="Adam steps refining the sparse ETF")
        realign_scale: float = Field(1.7, gt=0, description="the norm of every row of the realigned "
                                     "auxiliary head in the generic model")

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        if config.model.name == "logreg":
            raise ConfigError("fedloge trains a backbone under a fixed classifier, and logistic "
                              "regression has no backbone: use model.name = 'mlp', 'cnn' or 'resnet'")
        if "proximal" in config.client.objectives:
            raise ConfigError("fedloge with client.objectives.proximal: its clients train a "
                              "backbone and two heads of their own, which the proximal term's "
                              "anchor (the global model) does not name; remove the objective")

    # ---- server half ------------------------------------------------------------------------
    def head_of(self, current: Arrays) -> tuple[str, str]:
        """The head's keys: the last trainable 2-d weight (the last nn.Linear's, which clients
        check is the model's last layer) and its bias."""
        weight = [n for n in self.run.param_names if current[n].ndim == 2][-1]
        return weight, weight.removesuffix("weight") + "bias"

    def broadcast(self, server_round: int, current: Arrays) -> Arrays:
        if "sse" not in self.state:  # first round: build SSE-C and the auxiliary head
            weight, bias = self.head_of(current)
            classes, dim = current[weight].shape
            p = self.params
            self.state["sse"] = sparse_etf(classes, dim, p.sparsity, p.etf_norm, p.etf_steps,
                                           derive_seed(self.run.seed, SSE_STREAM)).numpy()
            self.state["aux.weight"], self.state["aux.bias"] = current[weight], current[bias]
        return dict(self.state)

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        aux = result.means["aux"]
        self.state["aux.weight"], self.state["aux.bias"] = aux["weight"], aux["bias"]
        weight, bias = self.head_of(current)
        norms = np.linalg.norm(aux["weight"], axis=1, keepdims=True)
        realigned = (self.params.realign_scale * aux["weight"] / np.maximum(norms, 1e-12))
        return {**with_means(current, result), weight: realigned.astype(current[weight].dtype),
                bias: aux["bias"].astype(current[bias].dtype)}, {"aux_row_norm_ratio": float(
                    norms.max() / max(norms.min(), 1e-12))}

    # ---- client half ------------------------------------------------------------------------
    def local_head(self, ctx: ClientContext, classes: int, dim: int, device: torch.device) -> nn.Linear:
        """The client's local head: kept from its last round, else a seeded fresh one."""
        stored = ctx.store.load("local")
        if stored is not None:
            return linear(torch.as_tensor(stored["weight"], device=device),
                          torch.as_tensor(stored["bias"], device=device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.seed, ctx.client_id, LOCAL_HEAD_STREAM))
            return nn.Linear(dim, classes).to(device)

    @staticmethod
    def backbone(model: nn.Module) -> nn.Module:
        if not (isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear)
                and model[-1].bias is not None):
            raise ValueError("fedloge needs an nn.Sequential model whose last layer is its nn.Linear "
                             "head, with a bias")
        return model[:-1]

    def local_training(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
                       steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        sse = ctx.broadcast["sse"]
        aux = linear(ctx.broadcast["aux.weight"], ctx.broadcast["aux.bias"])
        net = LoGeNet(self.backbone(model), sse, aux, self.local_head(ctx, *sse.shape, sse.device))
        metrics = train_locally(net, data, ctx.settings, [*terms, HeadLosses(NoParams(), ctx)], seed,
                                ctx.lr, steps=steps)
        ctx.scratch["aux"] = arrays_of(aux)
        ctx.store.save("local", arrays_of(net.local))
        return metrics

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        return ClientUpdate(outputs={"model": without_head(model), "aux": ctx.scratch["aux"]})

    def personal_model(self, ctx: ClientContext, model: nn.Module, data: LocalData) -> bool:
        """The global backbone with one head: the local head plus the auxiliary head whose rows
        take the local head's norms, the classes absent from the client's training data masked
        (their logit is MASKED_LOGIT); none before the client's first round."""
        stored = ctx.store.load("local")
        if stored is None:
            return False
        g_weight, g_bias = ctx.broadcast["aux.weight"], ctx.broadcast["aux.bias"]
        l_weight, l_bias = (torch.as_tensor(stored[k], device=g_weight.device) for k in ("weight", "bias"))
        with torch.no_grad():
            weight = l_weight + g_weight * l_weight.norm(dim=1, keepdim=True)
            bias = l_bias + g_bias
            absent = torch.bincount(data.y_train, minlength=len(bias)) == 0
            weight[absent], bias[absent] = 0.0, MASKED_LOGIT
        load_arrays(model, dict(zip(head_keys(model), (weight, bias), strict=True)))
        return True
