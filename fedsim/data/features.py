"""Feature (domain) skew: deterministic per-domain transforms of the clients' inputs.

Client k belongs to domain k mod D. Domain d transforms every input its clients hold (train and
local test) at strength level d / (D - 1), so domain 0 is the original data: rotation by up to
`max_rotation` degrees, additive Gaussian noise up to `max_noise`, Gaussian blur up to `max_blur`
pixels, colour inversion (odd domains), a feature shift up to `max_shift` standard units along a
per-domain random direction (any input, tabular too), or `mixed` (domain d gets the d-th transform
of none, rotation, noise, invert, blur, at full strength). Each global test example is assigned a
domain uniformly at random and transformed alike, so central evaluation spans all domains.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsim.config import FeatureSection
from fedsim.data.arrays import ArrayDataset
from fedsim.errors import ConfigError

IMAGE_KINDS = ("rotation", "noise", "invert", "blur", "mixed")
MIXED = ("none", "rotation", "noise", "invert", "blur")


def domain_level(domain: int, domains: int) -> float:
    return domain / (domains - 1) if domains > 1 else 0.0


def transform(x: np.ndarray, kind: str, level: float, domain: int, spec: FeatureSection,
              seed: int, part: int) -> np.ndarray:
    """Inputs `x` (batch first) as seen in `domain`; float32 like the input. The shift direction
    is fixed by (seed, domain); the noise is drawn per (seed, domain, part)."""
    from scipy import ndimage  # here: the runtime of a deployed client never needs it

    if kind == "rotation" and level > 0:
        x = ndimage.rotate(x, level * spec.max_rotation, axes=(-2, -1), reshape=False, order=1)
    elif kind == "blur" and level > 0:
        x = ndimage.gaussian_filter(x, sigma=(0,) * (x.ndim - 2) + (level * spec.max_blur,) * 2)
    elif kind == "noise":
        noise_rng = np.random.default_rng([seed, 0x15E, domain, part])
        x = x + noise_rng.normal(0.0, level * spec.max_noise, x.shape)
    elif kind == "invert" and domain % 2 == 1:
        x = 1.0 - x
    elif kind == "shift":
        direction = np.random.default_rng([seed, 0x5817, domain]).standard_normal(x.shape[1:])
        x = x + level * spec.max_shift * direction
    return x.astype(np.float32)


def domain_view(x: np.ndarray, domain: int, spec: FeatureSection, seed: int, part: int) -> np.ndarray:
    if spec.kind == "mixed":
        return transform(x, MIXED[domain % len(MIXED)], 1.0, domain, spec, seed, part)
    return transform(x, spec.kind, domain_level(domain, spec.domains), domain, spec, seed, part)


def check_features(spec: FeatureSection, input_shape: tuple[int, ...]) -> None:
    if spec.kind in IMAGE_KINDS and spec.kind != "noise" and len(input_shape) != 3:
        raise ConfigError(f"data.features.kind = '{spec.kind}' needs image inputs (C, H, W), got "
                          f"{input_shape}; use 'shift' or 'noise' for tabular data")


def apply_feature_skew(dataset: ArrayDataset, client_idx: list[np.ndarray], spec: FeatureSection,
                       seed: int) -> tuple[ArrayDataset, np.ndarray]:
    """The dataset with each client's examples seen through its domain; also the test domains.

    `client_idx[k]` are all positions (train and local test) client k holds in `x_train`.
    """
    check_features(spec, dataset.input_shape)
    x_train, x_test = dataset.x_train.copy(), dataset.x_test.copy()
    test_domain = np.random.default_rng([seed, 0xD0]).integers(0, spec.domains, len(x_test))
    for domain in range(spec.domains):
        owned = [idx for k, idx in enumerate(client_idx) if k % spec.domains == domain]
        if owned:
            held = np.concatenate(owned)
            x_train[held] = domain_view(x_train[held], domain, spec, seed, part=0)
        shown = np.flatnonzero(test_domain == domain)
        x_test[shown] = domain_view(x_test[shown], domain, spec, seed, part=1)
    return replace(dataset, x_train=x_train, x_test=x_test), test_domain
