"""Many logistic-regression clients trained together, in lockstep.

For small models one SGD step costs less than the Python and PyTorch overhead around it. Here a
worker steps all its clients at once: client i's weights are slice i of a (clients, classes,
features) tensor, step t gathers every active client's t-th batch, and batched matrix products
compute all losses and (closed-form) gradients together. Each client sees exactly the batches
`train_locally` would draw (the same seeded reshuffles, partial last batches included) and the
same SGD update (momentum, weight decay), so the result equals training the clients one after
another up to float rounding. Clients with fewer steps drop out of the active set as they finish.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from clients.training import LocalData
from fedsim.config import ClientSection, ExperimentConfig
from fedsim.system import planned_steps

PLAIN_KEYS = {"lr", "local_steps", "objectives"}  # client config keys lockstep training honours


def lockstep_proximal_mu(config: ExperimentConfig, client_configs: list[dict],
                         broadcast: bool) -> list[float] | None:
    """Each client's FedProx mu (0 without the term) when the task's clients can train in
    lockstep, else None. Lockstep needs logistic regression, plain SGD, no local objective but
    FedProx's proximal term, no broadcast arrays (SCAFFOLD's, GGEUR's), per-client settings
    limited to lr, local steps and objectives, and more than one client."""
    if not (config.engine.lockstep and config.model.name == "logreg"
            and config.client.optimizer == "sgd" and not broadcast and len(client_configs) > 1
            and all(set(c) <= PLAIN_KEYS for c in client_configs)):
        return None
    mus = []
    for client in client_configs:
        objectives = {**config.client.objectives, **client.get("objectives", {})}
        if set(objectives) - {"proximal"}:
            return None
        mus.append(float(objectives.get("proximal", {}).get("mu", 0.0)))
    return mus


def batch_plan(n: int, steps: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (steps, batch_size) and validity mask of one client's batches, drawn as
    `train_locally` draws them (a fresh permutation per pass from a generator seeded `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.zeros(steps, batch_size, dtype=torch.long)
    mask = torch.zeros(steps, batch_size)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            index[done, :len(rows)], mask[done, :len(rows)] = rows, 1.0
            done += 1
            if done == steps:
                break
    return index, mask


def train_in_lockstep(weight: torch.Tensor, bias: torch.Tensor, data: list[LocalData],
                      seeds: list[int], lrs: list[float], steps: list[int | None],
                      settings: ClientSection, mus: list[float] | None = None,
                      ) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """Train one softmax-regression client per entry of `data`, all from (weight, bias), each
    with FedProx's proximal term (mu / 2) ||params - start||^2 when its mu is not 0.

    Returns per client its final (weight, bias) and `train_locally`'s metrics; a client's
    `train_seconds` is the worker's time shared out in proportion to its steps."""
    started = time.perf_counter()
    device, count, batch = weight.device, len(data), settings.batch_size
    sizes = [len(d.y_train) for d in data]
    steps = [planned_steps(n, settings) if s is None else int(s) for n, s in zip(sizes, steps, strict=True)]
    order = sorted(range(count), key=lambda i: -steps[i])  # active clients are always a prefix
    offsets = np.concatenate([[0], np.cumsum([sizes[i] for i in order])])
    features = torch.cat([data[i].x_train.reshape(sizes[i], -1) for i in order])
    labels = torch.cat([data[i].y_train for i in order])
    horizon = max(steps)
    index = torch.zeros(count, horizon, batch, dtype=torch.long)
    mask = torch.zeros(count, horizon, batch)
    for slot, i in enumerate(order):
        rows, valid = batch_plan(sizes[i], steps[i], batch, seeds[i])
        index[slot, :steps[i]] = rows + int(offsets[slot])
        mask[slot, :steps[i]] = valid
    index, mask = index.to(device), mask.to(device)
    active = [sum(1 for s in steps if s > t) for t in range(horizon)]

    w = weight.detach().expand(count, *weight.shape).clone()
    b = bias.detach().expand(count, *bias.shape).clone()
    lr = torch.tensor([lrs[i] for i in order], device=device, dtype=w.dtype)
    mu = torch.tensor([(mus or [0.0] * count)[i] for i in order], device=device, dtype=w.dtype)
    proximal = bool(mu.any())
    momentum, decay = settings.momentum, settings.weight_decay
    velocity_w = velocity_b = None
    loss_sum = torch.zeros(count, device=device)
    for t in range(horizon):
        a = active[t]
        rows, valid = index[:a, t], mask[:a, t]
        x, y = features[rows], labels[rows]  # (a, B, d), (a, B)
        logits = torch.baddbmm(b[:a].unsqueeze(1), x, w[:a].transpose(1, 2))
        log_p = F.log_softmax(logits, dim=-1)
        share = valid / valid.sum(dim=1, keepdim=True)  # each batch's loss is a mean over its rows
        loss_sum[:a] -= (log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1) * share).sum(dim=1)
        residual = (log_p.exp() - F.one_hot(y, log_p.shape[-1]).to(log_p.dtype)) * share.unsqueeze(-1)
        grad_w, grad_b = torch.bmm(residual.transpose(1, 2), x), residual.sum(dim=1)
        if proximal:
            drift_w, drift_b = w[:a] - weight, b[:a] - bias
            loss_sum[:a] += 0.5 * mu[:a] * (drift_w.square().sum(dim=(1, 2)) + drift_b.square().sum(dim=1))
            grad_w = grad_w + mu[:a, None, None] * drift_w
            grad_b = grad_b + mu[:a, None] * drift_b
        if decay:
            grad_w, grad_b = grad_w + decay * w[:a], grad_b + decay * b[:a]
        if momentum:
            if velocity_w is None:
                velocity_w, velocity_b = grad_w.clone(), grad_b.clone()
            else:
                velocity_w[:a].mul_(momentum).add_(grad_w)
                velocity_b[:a].mul_(momentum).add_(grad_b)
            grad_w, grad_b = velocity_w[:a], velocity_b[:a]
        w[:a] -= lr[:a, None, None] * grad_w
        b[:a] -= lr[:a, None] * grad_b

    seconds = time.perf_counter() - started
    total_steps = max(sum(steps), 1)
    losses = loss_sum.cpu().tolist()
    results: list = [None] * count
    for slot, i in enumerate(order):
        metrics = {"train_loss": losses[slot] / max(steps[i], 1), "num_examples": float(sizes[i]),
                   "steps": float(steps[i]), "train_seconds": seconds * steps[i] / total_steps}
        results[i] = ({"weight": w[slot], "bias": b[slot]}, metrics)
    return results
