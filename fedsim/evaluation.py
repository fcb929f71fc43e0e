"""Evaluation of a model on labelled data: mean cross-entropy loss and accuracy, and accuracy
under adversarial attacks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.attacks import fgsm, pgd
from fedsim.config import RobustSection


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


def spread(values: np.ndarray) -> dict[str, float]:
    """Mean, std and the mean of the worst 10% (at least one) of per-client values (NaNs, from
    clients without test examples, left out)."""
    values = np.sort(np.asarray(values, dtype=float))
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": float("nan"), "std": float("nan"), "worst10": float("nan")}
    return {"mean": float(values.mean()), "std": float(values.std()),
            "worst10": float(values[:max(1, len(values) // 10)].mean())}


CLASS_GROUPS = ("many", "medium", "few")


def long_tail_groups(class_counts: np.ndarray) -> np.ndarray:
    """Per class its group in the long tail (0 many, 1 medium, 2 few): classes ranked by training
    count, the C // 3 largest many, the C // 3 smallest few, the rest medium (ties: lower class
    index first)."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    third = len(order) // 3
    groups = np.ones(len(order), dtype=np.int64)
    groups[order[:third]], groups[order[len(order) - third:]] = 0, 2
    return groups


def class_group_accuracy(predicted: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Accuracy over the test examples of each long-tail group, as `test_accuracy_<group>`."""
    out = {}
    for index, name in enumerate(CLASS_GROUPS):
        rows = groups[y] == index
        correct = predicted[rows] == y[rows]
        out[f"test_accuracy_{name}"] = float(correct.mean()) if rows.any() else float("nan")
    return out


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: RobustSection,
                    batch_size: int = 500) -> dict[str, float]:
    """Accuracy under each attack and eps of `spec` on the first `spec.examples` rows, as
    `robust_<attack>_accuracy_eps<eps>`, and without attack on the same rows as
    `robust_clean_accuracy` (the model in eval mode)."""
    was_training = model.training
    model.eval()
    x, y = x[:spec.examples], y[:spec.examples]
    clean = (predict(model, x) == y).float().mean().item() if len(y) else float("nan")
    out = {"robust_clean_accuracy": clean}
    for eps in spec.eps:
        for attack in spec.attacks:
            correct = 0
            for start in range(0, len(y), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                if attack == "fgsm":
                    adv = fgsm(model, xb, yb, eps, spec.box)
                else:
                    adv = pgd(model, xb, yb, eps, spec.steps, spec.step_for(eps), spec.norm,
                              input_range=spec.box)
                with torch.no_grad():
                    correct += (model(adv).argmax(dim=1) == yb).sum().item()
            out[f"robust_{attack}_accuracy_eps{eps:g}"] = correct / len(y) if len(y) else float("nan")
    model.train(was_training)
    return out
