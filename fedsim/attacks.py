"""Adversarial examples: projected gradient descent (Madry et al., 2018) in an L-inf or L2 ball,
and FGSM (Goodfellow et al., 2015) as its one-step L-inf case; used by robust evaluation and by
federated adversarial training.

Each step moves the inputs along the gradient of the cross-entropy (its sign for L-inf, its
direction for L2) by `step_size`, then projects back into the `eps`-ball around the clean
inputs and, given `input_range`, into that box. Only the inputs receive gradients: the model's
parameters are left without any.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Norm = Literal["linf", "l2"]


def _per_example_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm,
            input_range: tuple[float, float] | None = None) -> torch.Tensor:
    """`x_adv` moved back into the eps-ball around `x` (and the input range)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_example_norm(delta)).clamp(max=1.0)
    out = x + delta
    return out.clamp(*input_range) if input_range is not None else out


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
        step_size: float, norm: Norm = "linf", random_start: bool = False,
        input_range: tuple[float, float] | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial versions of `x` after `steps` steps of PGD (the model in its current mode)."""
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
        if norm == "l2":
            noise = noise / _per_example_norm(noise) * eps
        x_adv = project(x + noise * (eps if norm == "linf" else 1.0), x, eps, norm, input_range)
    for _ in range(steps if eps > 0 else 0):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            move = grad.sign() if norm == "linf" else grad / _per_example_norm(grad)
            x_adv = project(x_adv + step_size * move, x, eps, norm, input_range)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         input_range: tuple[float, float] | None = None) -> torch.Tensor:
    """FGSM: one L-inf step of size eps."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, norm="linf", input_range=input_range)
