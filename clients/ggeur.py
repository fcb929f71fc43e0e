"""GGEUR on the client: the statistics a client reports, and its class top-up by geometric
sampling around its own examples (and other clients' prototypes) with the shapes the server sent.

    x_new = x + sum_m eps_m * sqrt(lambda_m) * xi_m,    eps_m ~ N(0, 1)

i.e. a draw from N(x, Sigma_c). The paper's figure writes lambda_m instead of sqrt(lambda_m);
that variant is `scaling = "lambda"`. The server side is `strategies.ggeur`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Scaling = Literal["sqrt", "lambda"]


def class_statistics(embeddings: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a client sends: per class the count (C,), the sum (C, d) and the outer-product sum
    (C, d, d) of its embeddings; nothing per example."""
    x = np.asarray(embeddings, dtype=np.float64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, labels, x)
    outers = np.zeros((num_classes, x.shape[1], x.shape[1]))
    for c in range(num_classes):
        members = x[labels == c]
        outers[c] = members.T @ members
    return counts, sums, outers


def sample_around(centers: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray,
                  rng: np.random.Generator, scaling: Scaling = "sqrt") -> np.ndarray:
    """One draw around each center: center + sum_m eps_m * scale(lambda_m) * xi_m."""
    scale = np.sqrt(eigenvalues) if scaling == "sqrt" else eigenvalues
    noise = rng.standard_normal((len(centers), len(eigenvalues))) * scale
    return centers + noise @ eigenvectors.T


def augment(x: np.ndarray, y: np.ndarray, shapes: dict[int, tuple[np.ndarray, np.ndarray]],
            target: int | np.ndarray, rng: np.random.Generator, scaling: Scaling = "sqrt",
            prototypes: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top every class with a shape up to `target` examples (one count, or one per class); the
    originals are always kept.

    New examples are drawn around the client's own examples of the class (several around each
    when it has few, then a random subset) and, when `prototypes` gives other domains' class
    means, around those too. A class the client lacks entirely is generated around the
    prototypes only, or skipped without them.
    """
    parts_x, parts_y = [x], [y]
    for label, (values, vectors) in shapes.items():
        own = x[y == label]
        missing = int(target if np.isscalar(target) else target[label]) - len(own)
        if missing <= 0:
            continue
        centers = own
        if prototypes and label in prototypes:
            centers = np.vstack([own, prototypes[label]]) if len(own) else prototypes[label]
        if len(centers) == 0:
            continue
        repeats = math.ceil(missing / len(centers))
        drawn = sample_around(np.repeat(centers, repeats, axis=0), values, vectors, rng, scaling)
        keep = rng.choice(len(drawn), missing, replace=False)
        parts_x.append(drawn[keep].astype(x.dtype))
        parts_y.append(np.full(missing, label, dtype=y.dtype))
    return np.concatenate(parts_x), np.concatenate(parts_y)


def augmented_training_set(x: np.ndarray, y: np.ndarray, client_id: int, shared: dict[str, np.ndarray],
                           rng: np.random.Generator, scaling: Scaling) -> tuple[np.ndarray, np.ndarray]:
    """A client's training set topped up with the shapes the server sent."""
    values, vectors = shared["ggeur.values"], shared["ggeur.vectors"]
    shapes = {c: (values[c], vectors[c]) for c in range(len(values)) if values[c].any()}
    prototypes = None
    if "ggeur.prototypes" in shared:
        others = shared["ggeur.present"].astype(bool)
        others[client_id] = False
        prototypes = {c: shared["ggeur.prototypes"][others[:, c], c] for c in shapes if others[:, c].any()}
    flat = x.reshape(len(x), -1)
    new_x, new_y = augment(flat, y, shapes, shared["ggeur.target"], rng, scaling, prototypes)
    return new_x.reshape((len(new_x), *x.shape[1:])), new_y
