"""Evaluation of a model on labelled data: mean cross-entropy loss and accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of `model` over all of (x, y), in eval mode (NaN when empty)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
    model.train(was_training)
    n = len(y)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0.0}
    return {"loss": total_loss / n, "accuracy": correct / n, "num_examples": float(n)}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The predicted class of every row of `x`, in eval mode."""
    was_training = model.training
    model.eval()
    labels = [model(x[start:start + batch_size]).argmax(dim=1) for start in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
