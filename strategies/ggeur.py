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


def shapes_from_statistics(per_client: dict[int, dict[str, np.ndarray]], num_clients: int,
                           target: int | None, with_prototypes: bool) -> dict[str, np.ndarray]:
    """Pool the clients' reported statistics into what every client is sent: per class the
    eigenvalues (C, d) and eigenvectors (C, d, d) of the global covariance and the target count,
    and optionally every client's class means with a mask of the classes it reported."""
    counts = sum(s["counts"] for s in per_client.values())
    sums = sum(s["sums"] for s in per_client.values())
    outers = sum(s["outers"] for s in per_client.values())
    num_classes, dim = sums.shape
    values, vectors = np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim))
    for c in np.flatnonzero(counts > 0):
        values[c], vectors[c] = geometric_shape(pool_sums(counts[c], sums[c], outers[c])[1])
    targets = np.full(num_classes, float(target)) if target else np.ceil(counts / num_clients)
    shared = {"ggeur.values": values.astype(np.float32), "ggeur.vectors": vectors.astype(np.float32),
              "ggeur.target": targets}  # float32 halves what every training message carries
    if with_prototypes:
        means, present = np.zeros((num_clients, num_classes, dim)), np.zeros((num_clients, num_classes))
        for cid, stats in per_client.items():
            held = stats["counts"] > 0
            means[cid, held] = stats["sums"][held] / stats["counts"][held, None]
            present[cid] = held
        shared.update({"ggeur.prototypes": means.astype(np.float32), "ggeur.present": present})
    return shared


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
