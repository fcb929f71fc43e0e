"""Many clients trained as one vectorized program with PyTorch's function transforms.

The clients of a worker share the model's code, so one `torch.func.vmap` of
`grad_and_value(loss)` computes every client's loss and gradients in one call per local step:
client i's parameters are slice i of stacked tensors, step t gathers every active client's t-th
batch (the same seeded reshuffles as `train_locally`, short batches padded and masked), and the
optimizer update (SGD with momentum and weight decay, or Adam) is written once, functionally, for
all of them. The method's loss terms are evaluated inside the vectorized step through
`functional_call` on the model, so each term has one definition; a term whose tensors differ
per client (FedProx's anchor) names them in `LossTerm.per_client`. Step shifts (SCAFFOLD's
correction) move the stacked parameters after each update, as `train_locally` moves one model.

What does not vectorize falls back to one-by-one training, with the reason: models with
buffers (BatchNorm's running statistics), clients whose loss terms differ in kind or
parameters, and terms with data-dependent control flow (vmap refuses them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from clients.augment import augment, draw_keys
from fedsim.config import ClientSection
from fedsim.data.tensors import LocalData
from fedsim.method import Batch, LossTerm, split_shifts
from fedsim.system import planned_steps

Params = dict[str, torch.Tensor]


def vectorize_blocker(model: nn.Module, terms: list[list[LossTerm]]) -> str:
    """Why these clients cannot train as one vectorized program ('' when they can)."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (e.g. BatchNorm running statistics)"
    if any(not p.requires_grad for p in model.parameters()):
        return "the model has frozen parameters"
    undeclared = sorted({type(t).__name__ for client in terms for t in client if t.per_client is None})
    if undeclared:
        return f"loss term(s) {', '.join(undeclared)} do not declare their per-client tensors (per_client)"
    kinds = [[(type(t), t.params) for t in client] for client in terms]
    if any(k != kinds[0] for k in kinds):
        return "the clients' loss terms differ in kind or parameters"
    return ""


def clients_per_chunk(model: nn.Module, data: LocalData, terms: list[LossTerm], settings: ClientSection,
                      budget_bytes: float) -> int:
    """How many clients like this one (its data and loss terms) one vectorized program may hold
    within `budget_bytes`: per client its parameters with their gradients and optimizer state,
    its training data and per-client term tensors, and one batch's activations (measured by a
    forward pass on one example, kept three times over for the backward pass)."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(data.x_train[:1])
    finally:
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = 2 if settings.optimizer == "adam" else int(settings.momentum > 0)
    term_tensors = sum(t.numel() * t.element_size() for term in terms for attr in (term.per_client or ())
                       for t in getattr(term, attr).values())
    example = data.x_train[:1].numel() * data.x_train.element_size()
    per_client = (params * (3 + slots) + 3 * settings.batch_size * sum(sizes) + term_tensors
                  + data.x_train.numel() * data.x_train.element_size() + settings.batch_size * example)
    return max(1, int(budget_bytes // per_client))


def batch_plan(n: int, steps: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (steps, batch_size) and validity mask of one client's batches, drawn as
    `train_locally` draws them (a fresh permutation per pass from a generator seeded `seed`)."""
    if steps == 0:
        return torch.zeros(0, batch_size, dtype=torch.long), torch.zeros(0, batch_size)
    generator = torch.Generator().manual_seed(seed)
    per_pass = math.ceil(n / batch_size)
    width = per_pass * batch_size  # a pass padded to whole batches; the padding is masked out
    index = torch.zeros(math.ceil(steps / per_pass), width, dtype=torch.long)
    for number in range(len(index)):
        index[number, :n] = torch.randperm(n, generator=generator)
    mask = (torch.arange(width) < n).float().expand(len(index), width)
    return (index.view(-1, batch_size)[:steps],
            mask.reshape(-1, batch_size)[:steps])


@dataclass
class ClientBatches:
    """Every client's batches for a run of steps in lockstep: clients ordered by their number
    of steps (most first, so the active ones are always a prefix), their training data
    concatenated, and per client and step the rows of its batch (`index`, into the concatenated
    data) and which of them are real (`mask`: short batches are padded)."""

    order: list[int]  # slot -> the client's position in the caller's list
    seeds: torch.Tensor  # per slot, the client's seed
    sizes: list[int]
    steps: list[int]
    features: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None
    index: torch.Tensor  # (clients, steps, batch) row numbers
    mask: torch.Tensor  # (clients, steps, batch) 1 for a real row
    active: list[int]  # per step, how many clients still train

    @classmethod
    def build(cls, data: list[LocalData], seeds: list[int], steps: list[int | None],
              settings: ClientSection, device: torch.device) -> ClientBatches:
        sizes = [len(d.y_train) for d in data]
        steps = [0 if n == 0 else planned_steps(n, settings) if s is None else int(s)
                 for n, s in zip(sizes, steps, strict=True)]
        order = sorted(range(len(data)), key=lambda i: -steps[i])
        offsets = [0, *torch.tensor([sizes[i] for i in order]).cumsum(0).tolist()]
        features = torch.cat([data[i].x_train for i in order])
        groups = torch.cat([data[i].z_train for i in order]) if data[0].z_train is not None else None
        horizon, batch = max(steps), settings.batch_size
        index = torch.zeros(len(data), horizon, batch, dtype=torch.long)
        mask = torch.zeros(len(data), horizon, batch, dtype=features.dtype)
        for slot, i in enumerate(order):
            rows, valid = batch_plan(sizes[i], steps[i], batch, seeds[i])
            index[slot, :steps[i]] = rows + offsets[slot]
            mask[slot, :steps[i]] = valid
        labels = torch.cat([data[i].y_train for i in order])
        active = [sum(1 for s in steps if s > t) for t in range(horizon)]
        seeds_in_order = torch.tensor([seeds[i] for i in order], device=device)
        return cls(order, seeds_in_order, sizes, steps, features, labels, groups, index.to(device),
                   mask.to(device), active)

    def results(self, params_of_slot: Callable[[int], Any], loss_sum: torch.Tensor,
                seconds: float) -> list[tuple[Any, dict[str, float]]]:
        """Per client, in the caller's order: its trained parameters and `train_locally`'s
        metrics (its `train_seconds`: the time shared out in proportion to its steps)."""
        total_steps, losses = max(sum(self.steps), 1), loss_sum.cpu().tolist()
        results: list = [None] * len(self.order)
        for slot, i in enumerate(self.order):
            n, steps = self.sizes[i], self.steps[i]
            metrics = {"train_loss": losses[slot] / max(steps, 1), "num_examples": float(n),
                       "steps": float(steps), "train_seconds": seconds * steps / total_steps}
            results[i] = (params_of_slot(slot), metrics)
        return results


class FunctionalOptimizer:
    """`torch.optim.SGD` (momentum, weight decay, no dampening) or `torch.optim.Adam` as pure
    updates of stacked parameters; state tensors are stacked the same way."""

    def __init__(self, settings: ClientSection, lr: float) -> None:
        if settings.optimizer not in ("sgd", "adam"):
            raise ValueError(f"no functional update for client.optimizer = '{settings.optimizer}'")
        self.kind, self.lr = settings.optimizer, lr
        self.momentum, self.decay = settings.momentum, settings.weight_decay
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0

    @torch.no_grad()
    def step(self, params: Params, grads: Params, active: int) -> None:
        """Update the first `active` clients' parameters in place."""
        self.steps += 1
        for name, grad in grads.items():
            p = params[name][:active]
            if self.decay:
                grad = grad.add(p, alpha=self.decay)
            state = self.state.setdefault(name, {})
            if self.kind == "adam":
                self._adam(state, params[name], p, grad, active)
            else:
                p.add_(self._momentum(state, params[name], grad, active), alpha=-self.lr)

    def _momentum(self, state, full: torch.Tensor, grad: torch.Tensor, active: int) -> torch.Tensor:
        if not self.momentum:
            return grad
        if "buffer" not in state:
            state["buffer"] = torch.zeros_like(full)
            state["buffer"][:active] = grad
        else:
            state["buffer"][:active].mul_(self.momentum).add_(grad)
        return state["buffer"][:active]

    def _adam(self, state, full: torch.Tensor, p: torch.Tensor, grad: torch.Tensor, active: int) -> None:
        beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as make_optimizer uses
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(full), torch.zeros_like(full)
        m, v = state["m"][:active], state["v"][:active]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(1 - beta2**self.steps)).add_(eps)
        p.addcdiv_(m, denom, value=-self.lr / (1 - beta1**self.steps))


def _stack_term_tensors(terms: list[list[LossTerm]]) -> list[dict[str, Params]]:
    """Per term position: each `per_client` attribute's tensors stacked over clients."""
    stacked = []
    for position, template in enumerate(terms[0]):
        stacked.append({attr: {k: torch.stack([getattr(client[position], attr)[k] for client in terms])
                               for k in getattr(template, attr)}
                        for attr in template.per_client})
    return stacked


class Objective(nn.Module):
    """One client's loss on one (padded) batch: the weighted cross-entropy plus the loss terms.
    `functional_call` on it swaps a client's parameters into the model for the forward pass and
    for the terms alike."""

    def __init__(self, model: nn.Module, terms: list[LossTerm]) -> None:
        super().__init__()
        self.model, self.terms = model, terms

    def forward(self, x, y, weights, groups, term_tensors: list[dict[str, Params]]) -> torch.Tensor:
        logits = self.model(x)
        total = (F.cross_entropy(logits, y, reduction="none") * weights).sum()
        batch = Batch(x, logits, y, groups, weights)
        for term, tensors in zip(self.terms, term_tensors, strict=True):
            for attr, value in tensors.items():  # this client's slice of its per-client tensors
                setattr(term, attr, value)
            total = total + term.penalty(self.model, batch)
        return total


def client_loss(model: nn.Module, templates: list[LossTerm]) -> Callable:
    """loss(params, x, y, weights, groups, term_tensors) of one client, for vmap."""
    objective = Objective(model, templates)

    def loss(params: Params, x, y, weights, groups, term_tensors):
        named = {f"model.{k}": v for k, v in params.items()}
        return functional_call(objective, named, (x, y, weights, groups, term_tensors))

    return loss


@contextmanager
def _templates_restored(templates: list[LossTerm]) -> Iterator[None]:
    """Vectorized steps set the template terms' per-client attributes to batched tensors; put
    the template client's own values back afterwards."""
    saved = [{attr: getattr(term, attr) for attr in term.per_client} for term in templates]
    try:
        yield
    finally:
        for term, attrs in zip(templates, saved, strict=True):
            for attr, value in attrs.items():
                setattr(term, attr, value)


def _batch_features(batches: ClientBatches, rows: torch.Tensor, step: int, kinds: list[str]) -> torch.Tensor:
    """The active clients' inputs at one step (clients, batch, ...), augmented as one by one."""
    features = batches.features[rows]
    if not kinds:
        return features
    keys = draw_keys(batches.seeds[:len(rows)], step, rows.shape[1])
    return augment(features.flatten(0, 1), keys.flatten(), kinds).view(features.shape)


def _run_steps(step_fn, params: Params, optimizer: FunctionalOptimizer, loss_sum: torch.Tensor,
               batches: ClientBatches, term_tensors, shifts: list[Params], augment_kinds: list[str]) -> None:
    """Every local step: the active clients' batches, losses and gradients, then the update and
    the step shifts (`shifts`: per shift term, its stacked tensors by parameter name)."""
    labels, groups = batches.labels, batches.groups
    for t, a in enumerate(batches.active):
        rows, valid = batches.index[:a, t], batches.mask[:a, t]
        weights = valid / valid.sum(dim=1, keepdim=True)
        current = {k: v[:a] for k, v in params.items()}
        tensors = [{attr: {k: v[:a] for k, v in by_name.items()} for attr, by_name in term.items()}
                   for term in term_tensors]
        features = _batch_features(batches, rows, t, augment_kinds)
        grads, loss = step_fn(current, features, labels[rows], weights,
                              None if groups is None else groups[rows], tensors)
        loss_sum[:a] += loss.detach()
        optimizer.step(params, grads, a)
        for shift in shifts:
            for name, by_client in shift.items():
                params[name][:a].sub_(by_client[:a], alpha=optimizer.lr)


def train_vectorized(model: nn.Module, start: Params, data: list[LocalData], seeds: list[int],
                     steps: list[int | None], settings: ClientSection, lr: float,
                     terms: list[list[LossTerm]]) -> list[tuple[Params, dict[str, float]]]:
    """Train one client per entry of `data` from the parameters `start`, all in one vectorized
    program; returns per client its trained parameters and `train_locally`'s metrics (its
    `train_seconds` is the time shared out in proportion to its steps)."""
    started = time.perf_counter()
    device, count = next(iter(start.values())).device, len(data)
    batches = ClientBatches.build(data, seeds, steps, settings, device)
    ordered_terms, shift_terms = zip(*(split_shifts(terms[i]) for i in batches.order), strict=True)
    term_tensors = _stack_term_tensors(list(ordered_terms)) if ordered_terms[0] else []
    shifts = [s["shift"] for s in _stack_term_tensors(list(shift_terms))] if shift_terms[0] else []
    step_fn = vmap(grad_and_value(client_loss(model, ordered_terms[0])),
                   in_dims=(0, 0, 0, 0, None if batches.groups is None else 0, 0))
    params = {k: v.detach().expand(count, *v.shape).clone() for k, v in start.items()}
    optimizer = FunctionalOptimizer(settings, lr)
    loss_sum = torch.zeros(count, device=device)
    with _templates_restored(ordered_terms[0]):
        _run_steps(step_fn, params, optimizer, loss_sum, batches, term_tensors, shifts, settings.augment)
    return batches.results(lambda slot: {k: v[slot] for k, v in params.items()}, loss_sum,
                           time.perf_counter() - started)
