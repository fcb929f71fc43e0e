"""The local training loop every method shares: SGD/Adam over cross-entropy plus the loss terms of
the method, its add-ons and `client.objectives`, and the step shifts among those terms."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.sgd import sgd

from clients.augment import augment, draw_keys
from fedsim.config import ClientSection
from fedsim.data.tensors import LocalData
from fedsim.method import Batch, LossTerm, StepShift, split_shifts
from fedsim.system import planned_steps


class LeanSGD:
    """`torch.optim.SGD`'s update rule (PyTorch's own `torch.optim.sgd.sgd`) without the Optimizer
    wrapper's per-step bookkeeping, which costs more than the arithmetic for small models
    (about a third of a logistic-regression step on batches of 10)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        buffers = [self.buffers[i] for i in live]
        sgd([self.params[i] for i in live], [self.params[i].grad for i in live], buffers,
            foreach=False, weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr,
            dampening=0.0, nesterov=False, maximize=False)
        for i, buffer in zip(live, buffers, strict=True):
            self.buffers[i] = buffer


def make_optimizer(model: nn.Module, settings: ClientSection, lr: float,
                   lean: bool = True) -> torch.optim.Optimizer | LeanSGD:
    """A fresh local optimizer (no state carried between rounds); `lean = False` gives SGD as a
    `torch.optim.SGD` (for wrappers that need an Optimizer, such as Opacus')."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    sgd = LeanSGD if lean else torch.optim.SGD
    return sgd(model.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


@torch.no_grad()
def shift_parameters(model: nn.Module, shifts: list[StepShift], lr: float) -> None:
    """One step's shifts after the optimizer's update: w <- w - lr * shift (frozen parameters
    stay)."""
    for name, p in model.named_parameters():
        for term in shifts if p.requires_grad else ():
            p.sub_(term.shift[name], alpha=lr)


def train_locally(model: nn.Module, data: LocalData, settings: ClientSection,
                  terms: list[LossTerm], seed: int, lr: float,
                  steps: int | None = None) -> dict[str, float]:
    """Train `model` in place on the client's data; returns the mean loss and counts.

    `steps` (a straggler's reduced work) overrides the planned number of local steps.

    Batches come from reshuffled passes over the data, drawn from a generator seeded with
    `seed` (and `client.augment`'s crops and flips from `seed` too), so a client's training is a
    pure function of (global weights, data, seed).
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    steps = steps if steps is not None else planned_steps(n, settings)
    optimizer = make_optimizer(model, settings, lr)
    terms, shifts = split_shifts(terms)
    model.train()
    loss_sum, done = torch.zeros((), device=data.x_train.device), 0
    while done < steps and n > 0:  # a client without data takes no step
        order = torch.randperm(n, generator=generator).to(data.x_train.device)
        inputs, labels = data.x_train[order], data.y_train[order]  # one gather per pass
        groups = data.z_train[order] if data.z_train is not None else None
        for start in range(0, n, settings.batch_size):
            batch = slice(start, start + settings.batch_size)
            features = inputs[batch]
            if settings.augment:
                keys = draw_keys(torch.tensor(seed, device=features.device), done, len(features))
                features = augment(features, keys, settings.augment)
            logits = model(features)
            targets = labels[batch]
            loss = F.cross_entropy(logits, targets)
            if terms:
                seen = Batch(features, logits, targets, None if groups is None else groups[batch])
                for term in terms:
                    loss = loss + term.penalty(model, seen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if shifts:
                shift_parameters(model, shifts, lr)
            loss_sum += loss.detach()
            done += 1
            if done == steps:
                break
    return {"train_loss": loss_sum.item() / max(done, 1), "num_examples": float(n),
            "steps": float(done), "train_seconds": time.perf_counter() - started}
