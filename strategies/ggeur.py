"""GGEUR (CVPR 2025): geometric knowledge-guided global distribution alignment, server side.

Clients send, per class, only the count, the sum and the sum of outer products of their
embeddings (`clients.ggeur.class_statistics`); the server pools them into each class's global
mean and covariance (exactly those of the pooled data) and shares the covariance's
eigendecomposition, the class's "geometric shape", with every training message. Clients then
top their classes up by sampling (`clients.ggeur`).
"""

from __future__ import annotations

import numpy as np


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
