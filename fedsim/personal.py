"""Personalized FL: what methods whose clients keep parameters of their own share.

A personal method keeps each client's own parameters in its client store (`ctx.store`), never in
what the client sends, and rebuilds the client's personal model from them for evaluation
(`Method.personal_model`). `LocalLayers` is the common case: the client keeps some layers (a
head, the batch-norm layers) and shares the rest.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from clients.training import train_locally
from fedsim.data.tensors import LocalData
from fedsim.evaluation import CLASS_GROUPS, evaluate, predict, spread
from fedsim.method import Arrays, ClientContext, ClientUpdate, LossTerm, Method, RoundResult


def head_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's classifier: its last `nn.Linear`."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to serve as its head")
    prefix = linears[-1] + "."
    return [k for k in model.state_dict() if k.startswith(prefix) and "." not in k[len(prefix):]]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of every batch-norm layer (affine weights and running statistics)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


def arrays_of(model: nn.Module) -> Arrays:
    """Copies of the model's state-dict entries."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def body_names(model: nn.Module) -> list[str]:
    """The trainable parameters outside the head."""
    head = set(head_keys(model))
    return [name for name, _ in model.named_parameters() if name not in head]


def without_head(model: nn.Module) -> Arrays:
    """Copies of the model's state-dict entries outside the head (what a client sends when it
    keeps or freezes its head)."""
    head = set(head_keys(model))
    return {k: v for k, v in arrays_of(model).items() if k not in head}


def load_arrays(model: nn.Module, arrays: Arrays) -> None:
    """Copy named arrays into the model's state in place (other entries stay)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, value in arrays.items():
            state[name].copy_(torch.as_tensor(value))


@contextmanager
def trainable_only(model: nn.Module, keys: list[str]):
    """Inside the block only the parameters named in `keys` train (the rest are frozen)."""
    wanted = set(keys)
    frozen = [p for name, p in model.named_parameters() if name not in wanted and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def train_keys(ctx: ClientContext, model: nn.Module, data: LocalData, keys: list[str], seed: int,
               steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
    """The shared local training loop with only the parameters named in `keys` trainable."""
    with trainable_only(model, keys):
        return train_locally(model, data, ctx.settings, terms, seed, ctx.lr, steps=steps)


def with_means(current: Arrays, result: RoundResult) -> Arrays:
    """The global arrays with every entry the clients sent replaced by its mean (the entries they
    keep or freeze stay as they were)."""
    return {**current, **result.means["model"]}


class LocalLayers(Method):
    """A method whose clients keep the state-dict entries `local_keys` to themselves. A client
    trains from the global model with its own copies of those entries (the global ones until it
    has trained once), keeps them in its store and sends the rest; the server averages what is
    sent and leaves the global model's copies of the local entries as they were."""

    def local_keys(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def restore(self, ctx: ClientContext, model: nn.Module) -> bool:
        """Put the client's own copies of its local entries into `model`; False before its first
        round (it has none)."""
        stored = ctx.store.load("local")
        if stored is not None:
            load_arrays(model, stored)
        return stored is not None

    def train(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
              steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        """Local training once the client's own entries are in place: the shared loop."""
        return train_locally(model, data, ctx.settings, terms, seed, ctx.lr, steps=steps)

    def local_training(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
                       steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        self.restore(ctx, model)
        return self.train(ctx, model, data, seed, steps, terms)

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        local = set(self.local_keys(model))
        state = arrays_of(model)
        ctx.store.save("local", {k: v for k, v in state.items() if k in local})
        return ClientUpdate(outputs={"model": {k: v for k, v in state.items() if k not in local}})

    def personal_model(self, ctx: ClientContext, model: nn.Module, data: LocalData) -> bool:
        return self.restore(ctx, model)

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        return with_means(current, result), {}


# ---- personal evaluation: per client, then pooled over the round's clients --------------------
def personal_report(model: nn.Module, data: LocalData, num_classes: int) -> dict[str, float]:
    """A client's personal model on its local test split: loss, accuracy, and per class its
    correct predictions and examples (`personal_correct_<c>`, `personal_count_<c>`), which the
    server pools into accuracy on the long tail's class groups."""
    y = data.y_test
    if not len(y):
        return {}
    metrics = evaluate(model, data.x_test, y)
    right = (predict(model, data.x_test) == y).float()
    correct = torch.zeros(num_classes, device=y.device).index_add_(0, y, right)
    count = torch.bincount(y, minlength=num_classes)
    out = {"personal_loss": metrics["loss"], "personal_accuracy": metrics["accuracy"]}
    for c in range(num_classes):
        out[f"personal_correct_{c}"], out[f"personal_count_{c}"] = float(correct[c]), float(count[c])
    return out


def personal_round_metrics(result: RoundResult, class_groups: np.ndarray | None) -> dict[str, float]:
    """The round's personal metrics over the clients that have a personal model (those that
    trained at least once): loss and accuracy weighted by test examples, their number, the
    spread of accuracy over them, and accuracy on the long tail's many / medium / few classes
    (their test examples pooled)."""
    clients = [c for c in result.clients if "personal_accuracy" in c.metrics]
    if not clients:
        return {}
    metrics = {"personal_loss": result.weighted_metric("personal_loss", "num_test_examples"),
               "personal_accuracy": result.weighted_metric("personal_accuracy", "num_test_examples"),
               "personal_clients": float(len(clients))}
    metrics.update({f"personal_accuracy_{k}": v for k, v in
                    spread([c.metrics["personal_accuracy"] for c in clients]).items()})
    if class_groups is not None:
        for index, name in enumerate(CLASS_GROUPS):
            classes = np.flatnonzero(class_groups == index)
            correct = sum(c.metrics.get(f"personal_correct_{k}", 0.0) for c in clients for k in classes)
            count = sum(c.metrics.get(f"personal_count_{k}", 0.0) for c in clients for k in classes)
            metrics[f"personal_accuracy_{name}"] = correct / count if count else float("nan")
    return metrics
