"""Train-time image augmentation on the worker's device: random crop (zero padding of 4, then a
random window of the original size) and random horizontal flip, the standard CIFAR recipe, and
cutout (a zeroed square of half the image's side at a random centre, as FixMatch's strong view).

The random choices are a counter-based hash of (client seed, local step, position in the batch)
instead of a generator's stream, so one-by-one and vectorized training draw the same crops and
flips for the same example, without any host round trip.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

PAD = 4
_MODULUS = 2_147_483_647  # 2^31 - 1: products with the multiplier below stay inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """One round of a Lehmer (MINSTD) generator with an xor-shift, elementwise on int64."""
    x = (x * 48271) % _MODULUS
    return x ^ (x >> 11)


def draw_keys(seeds: torch.Tensor, step: int, batch: int) -> torch.Tensor:
    """Per example of a batch a random key: `seeds` holds the clients' seeds (any shape S), the
    result has shape (*S, batch)."""
    base = _mix(_mix(seeds.to(torch.int64) % _MODULUS + 1) + step)
    return _mix(base.unsqueeze(-1) + torch.arange(1, batch + 1, device=seeds.device))


def augment(images: torch.Tensor, keys: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """`images` (N, C, H, W) cropped, flipped and/or cut out per example as `keys` (N,) decide."""
    if "flip" in kinds:
        flip = (_mix(keys) & 1).bool()
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if "crop" in kinds:
        n, _, height, width = images.shape
        dy = _mix(_mix(keys)) % (2 * PAD + 1)
        dx = _mix(_mix(_mix(keys))) % (2 * PAD + 1)
        padded = F.pad(images, (PAD, PAD, PAD, PAD))
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]
        images = padded[torch.arange(n, device=images.device)[:, None, None], :, rows, cols]
        images = images.permute(0, 3, 1, 2)
    if "cutout" in kinds:
        _, _, height, width = images.shape
        mixed = _mix(_mix(_mix(_mix(keys))))
        cy, cx = mixed % height, _mix(mixed) % width
        rows = (torch.arange(height, device=images.device)[None, :] - cy[:, None]).abs() < height // 4 + 1
        cols = (torch.arange(width, device=images.device)[None, :] - cx[:, None]).abs() < width // 4 + 1
        hole = rows[:, :, None] & cols[:, None, :]
        images = images.masked_fill(hole[:, None], 0.0)
    return images
