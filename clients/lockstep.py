"""Many small clients (logistic regression, MLPs) trained together, in lockstep.

For small models one SGD step costs less than the Python and PyTorch overhead around it. Here a
worker steps all its clients at once: client i's weights are slice i of (clients, out, in)
tensors, step t gathers every active client's t-th batch, and batched matrix products compute
all losses and (hand-derived) gradients together. Each client sees exactly the batches
`train_locally` would draw (the same seeded reshuffles, partial last batches included) and the
same optimizer update (vectorized training's functional SGD with momentum and weight decay, or
Adam), so the result equals training the clients one after another up to float rounding.
Clients with fewer steps drop out of the active set as they finish.
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from clients.vectorized import ClientBatches, FunctionalOptimizer
from fedsim.config import ClientSection, ExperimentConfig
from fedsim.data.tensors import LocalData
from fedsim.method import LossTerm, TrainPlan
from fedsim.terms import Proximal

LOCKSTEP_MODELS = ("logreg", "mlp")  # Linear layers with ReLU between them


def lockstep_possible(config: ExperimentConfig) -> bool:
    """Whether the hand-written kernels fit the run: logistic regression or an MLP, no
    augmentation."""
    return config.model.name in LOCKSTEP_MODELS and not config.client.augment


def lockstep_proximal_mu(plans: list[TrainPlan], terms: list[list[LossTerm]]) -> list[float] | None:
    """Each client's proximal weight mu (0 without the term, the sum of its proximal terms'
    otherwise) when the plans say no more than the local steps and no loss term but the
    proximal one is there, else None."""
    if not (all(type(plan) is TrainPlan for plan in plans)
            and all(type(term) is Proximal for client in terms for term in client)):
        return None
    return [sum(term.params.mu for term in client) for client in terms]


def _loss_and_gradients(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        share: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-client mean cross-entropy of a stack of Linear layers with ReLU between them, and its
    gradients (backpropagated by hand, batched over the leading client dimension)."""
    layers = len(params) // 2
    inputs, pre_activations = [x], []
    for layer in range(layers):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        z = torch.baddbmm(bias.unsqueeze(1), inputs[-1], weight.transpose(1, 2))
        if layer < layers - 1:
            pre_activations.append(z)
            inputs.append(F.relu(z))
    log_p = F.log_softmax(z, dim=-1)
    loss = -(log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1) * share).sum(dim=1)
    upstream = (log_p.exp() - F.one_hot(y, log_p.shape[-1]).to(log_p.dtype)) * share.unsqueeze(-1)
    grads: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    for layer in reversed(range(layers)):
        grads[2 * layer] = torch.bmm(upstream.transpose(1, 2), inputs[layer])
        grads[2 * layer + 1] = upstream.sum(dim=1)
        if layer:  # ReLU passes gradient where its input was positive (as PyTorch's does)
            upstream = torch.bmm(upstream, params[2 * layer]) * (pre_activations[layer - 1] > 0)
    return loss, grads


def train_in_lockstep(start: list[torch.Tensor], data: list[LocalData], seeds: list[int], lr: float,
                      steps: list[int | None], settings: ClientSection,
                      mus: list[float] | None = None) -> list[tuple[list[torch.Tensor], dict[str, float]]]:
    """Train one client per entry of `data`, all from the parameters `start` (weight, bias of
    each Linear layer in order, ReLU between layers: logistic regression or an MLP), each with
    FedProx's proximal term (mu / 2) ||params - start||^2 when its mu is not 0, and the optimizer
    update vectorized training uses (SGD with momentum and weight decay, or Adam).

    Returns per client its final parameters and `train_locally`'s metrics; a client's
    `train_seconds` is the worker's time shared out in proportion to its steps."""
    started = time.perf_counter()
    device, count = start[0].device, len(data)
    batches = ClientBatches.build(data, seeds, steps, settings, device)
    order, index, mask = batches.order, batches.index, batches.mask
    features = batches.features.reshape(len(batches.features), -1)

    params = {str(k): p.detach().expand(count, *p.shape).clone() for k, p in enumerate(start)}
    mu = torch.tensor([(mus or [0.0] * count)[i] for i in order], device=device, dtype=start[0].dtype)
    proximal = bool(mu.any())
    optimizer = FunctionalOptimizer(settings, lr)
    loss_sum = torch.zeros(count, device=device)
    for t, a in enumerate(batches.active):
        rows, valid = index[:a, t], mask[:a, t]
        share = valid / valid.sum(dim=1, keepdim=True)  # each batch's loss is a mean over its rows
        current = [p[:a] for p in params.values()]
        loss, grads = _loss_and_gradients(current, features[rows], batches.labels[rows], share)
        loss_sum[:a] += loss
        if proximal:
            for k, (p, anchor) in enumerate(zip(current, start, strict=True)):
                drift = p - anchor
                loss_sum[:a] += 0.5 * mu[:a] * drift.square().flatten(1).sum(dim=1)
                grads[k] = grads[k] + mu[:a].view(-1, *[1] * (p.dim() - 1)) * drift
        optimizer.step(params, dict(zip(params, grads, strict=True)), a)

    return batches.results(lambda slot: [p[slot] for p in params.values()], loss_sum,
                           time.perf_counter() - started)
