"""GGEUR (CVPR 2025): geometric knowledge-guided global distribution alignment, in embedding space.

Clients send, per class, only the count, the sum and the sum of outer products of their
embeddings; the server pools them into each class's global mean and covariance (exactly those of
the pooled data) and broadcasts the covariance's eigendecomposition, the class's "geometric
shape". A client then tops every class up to a target count by sampling around its own examples
(and, with several domains, around the other clients' class prototypes):

    x_new = x + sum_m eps_m * sqrt(lambda_m) * xi_m,    eps_m ~ N(0, 1)

i.e. a draw from N(x, Sigma_c). The paper's figure writes lambda_m instead of sqrt(lambda_m);
that variant is `scaling = "lambda"`.
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


def pool_class_statistics(counts: np.ndarray, means: np.ndarray,
                          covariances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool one class over K clients: counts (K,), means (K, d), biased covariances (K, d, d).

    Returns the mean (d,) and the biased covariance (d, d) of the concatenated data:
    Sigma = (1/N) [sum_k n_k S_k + sum_k n_k (mu_k - mu)(mu_k - mu)^T].
    """
    n = np.asarray(counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        raise ValueError("no client holds an example of this class")
    mean = n @ means / total
    spread = means - mean
    within = np.tensordot(n, covariances, axes=1)
    between = (spread * n[:, None]).T @ spread
    return mean, (within + between) / total


def pool_sums(counts: np.ndarray, sums: np.ndarray, outers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same pooling from summed client statistics of one class: count, sum (d,), outer sum
    (d, d) added over clients (what secure aggregation would deliver)."""
    mean = sums / counts
    return mean, outers / counts - np.outer(mean, mean)


def geometric_shape(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0, descending) and eigenvectors (columns) of a covariance."""
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    order = np.argsort(values)[::-1]
    return np.clip(values[order], 0.0, None), vectors[:, order]


def sample_around(centers: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray,
                  rng: np.random.Generator, scaling: Scaling = "sqrt") -> np.ndarray:
    """One draw around each center: center + sum_m eps_m * scale(lambda_m) * xi_m."""
    scale = np.sqrt(eigenvalues) if scaling == "sqrt" else eigenvalues
    noise = rng.standard_normal((len(centers), len(eigenvalues))) * scale
    return centers + noise @ eigenvectors.T


def augment(x: np.ndarray, y: np.ndarray, shapes: dict[int, tuple[np.ndarray, np.ndarray]], target: int,
            rng: np.random.Generator, scaling: Scaling = "sqrt",
            prototypes: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top every class with a shape up to `target` examples; the originals are always kept.

    New examples are drawn around the client's own examples of the class (several around each
    when it has few, then a random subset) and, when `prototypes` gives other domains' class
    means, around those too. A class the client lacks entirely is generated around the
    prototypes only, or skipped without them.
    """
    parts_x, parts_y = [x], [y]
    for label, (values, vectors) in shapes.items():
        own = x[y == label]
        missing = target - len(own)
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
