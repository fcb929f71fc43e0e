"""GGEUR (CVPR 2025): geometric knowledge-guided global distribution alignment, an add-on to any
method (`[ggeur] enabled = true`), working on embeddings (`data.embedding`).

Setup phase: every client sends, per class, only the count, the sum and the sum of outer
products of its embeddings; the server pools them into each class's global mean and covariance
(exactly those of the pooled data) and shares the covariance's eigendecomposition, the class's
"geometric shape", with every training message.
Client: each class is topped up, by default to the class's global count as in the reference
code, by sampling around the client's own examples (and, with `prototypes`, other clients' class
means, each drawn around as often as the client's own examples together, as in the reference's
multi-domain code) with the shape the server sent:

    x_new = x + sum_m eps_m * sqrt(lambda_m) * xi_m,    eps_m ~ N(0, 1)

i.e. a draw from N(x, Sigma_c). The paper's figure writes lambda_m instead of sqrt(lambda_m);
that variant is `scaling = "lambda"`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import numpy as np
import torch

from fedsim.config import GgeurSection
from fedsim.data.tensors import LocalData
from fedsim.method import AddOn, Arrays, ClientContext
from fedsim.seeding import derive_seed

Scaling = Literal["sqrt", "lambda"]
GGEUR_STREAM = 0x6E0


# ---- client half: statistics and sampling ------------------------------------------------------
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


def draws_around(centers: np.ndarray, count: int, values: np.ndarray, vectors: np.ndarray,
                 rng: np.random.Generator, scaling: Scaling) -> np.ndarray:
    """`count` draws around `centers`: the same number around each (several when they are few),
    then a random subset of `count`."""
    repeats = math.ceil(count / len(centers))
    drawn = sample_around(np.repeat(centers, repeats, axis=0), values, vectors, rng, scaling)
    return drawn[rng.choice(len(drawn), count, replace=False)]


def augment(x: np.ndarray, y: np.ndarray, shapes: dict[int, tuple[np.ndarray, np.ndarray]],
            target: int | np.ndarray, rng: np.random.Generator, scaling: Scaling = "sqrt",
            prototypes: dict[int, np.ndarray] | None = None,
            prototype_draws: str = "domain") -> tuple[np.ndarray, np.ndarray]:
    """Top every class with a shape up to `target` examples (one count, or one per class); the
    originals are always kept.

    New examples are drawn around the client's own examples of the class and, when `prototypes`
    gives other clients' (domains') class means, around those too: with `prototype_draws =
    "domain"` (the reference code) the client's own examples together and each prototype are one
    group each and every group gets the same number of draws, so with 3 other domains about three
    quarters of the new examples come from them; with "center" each prototype is one more centre
    beside the client's examples. A class the client lacks entirely is generated around the
    prototypes only, or skipped without them.
    """
    parts_x, parts_y = [x], [y]
    for label, (values, vectors) in shapes.items():
        own = x[y == label]
        missing = int(target if np.isscalar(target) else target[label]) - len(own)
        others = prototypes.get(label, x[:0]) if prototypes else x[:0]
        if missing <= 0 or len(own) + len(others) == 0:
            continue
        if prototype_draws == "domain" and len(others):
            groups = ([own] if len(own) else []) + [others[i:i + 1] for i in range(len(others))]
            per_group = math.ceil(missing / len(groups))
            pool = np.vstack([draws_around(g, per_group, values, vectors, rng, scaling) for g in groups])
            drawn = pool[rng.choice(len(pool), missing, replace=False)]
        else:
            drawn = draws_around(np.vstack([own, others]), missing, values, vectors, rng, scaling)
        parts_x.append(drawn.astype(x.dtype))
        parts_y.append(np.full(missing, label, dtype=y.dtype))
    return np.concatenate(parts_x), np.concatenate(parts_y)


def augmented_training_set(x: np.ndarray, y: np.ndarray, client_id: int, shared: dict[str, np.ndarray],
                           rng: np.random.Generator, scaling: Scaling,
                           prototype_draws: str = "domain") -> tuple[np.ndarray, np.ndarray]:
    """A client's training set topped up with the shapes the server sent."""
    values, vectors = shared["values"], shared["vectors"]
    shapes = {c: (values[c], vectors[c]) for c in range(len(values)) if values[c].any()}
    prototypes = None
    if "prototypes" in shared:
        others = shared["present"].astype(bool)
        others[client_id] = False
        prototypes = {c: shared["prototypes"][others[:, c], c] for c in shapes if others[:, c].any()}
    flat = x.reshape(len(x), -1)
    new_x, new_y = augment(flat, y, shapes, shared["target"], rng, scaling, prototypes, prototype_draws)
    return new_x.reshape((len(new_x), *x.shape[1:])), new_y


# ---- server half: pooling ------------------------------------------------------------------
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
                           target: int | None, with_prototypes: bool,
                           target_rule: str = "global") -> dict[str, np.ndarray]:
    """Pool the clients' reported statistics into what every client is sent: per class the
    eigenvalues (C, d) and eigenvectors (C, d, d) of the global covariance and the target count
    (`target`, else the class's global count as in the reference code, `Single Domian/
    cov_matrix_generate_features.py` L93-101 of WeiDai-David/2025CVPR_GGEUR at 02624d5, or with
    `target_rule = "share"` that count / number of clients), and optionally every client's class
    means with a mask of the classes it reported."""
    counts = sum(s["counts"] for s in per_client.values())
    sums = sum(s["sums"] for s in per_client.values())
    outers = sum(s["outers"] for s in per_client.values())
    num_classes, dim = sums.shape
    values, vectors = np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim))
    for c in np.flatnonzero(counts > 0):
        values[c], vectors[c] = geometric_shape(pool_sums(counts[c], sums[c], outers[c])[1])
    if target:
        targets = np.full(num_classes, float(target))
    else:
        targets = counts if target_rule == "global" else np.ceil(counts / num_clients)
    shared = {"values": values.astype(np.float32), "vectors": vectors.astype(np.float32),
              "target": targets}  # float32 halves what every training message carries
    if with_prototypes:
        means, present = np.zeros((num_clients, num_classes, dim)), np.zeros((num_clients, num_classes))
        for cid, stats in per_client.items():
            held = stats["counts"] > 0
            means[cid, held] = stats["sums"][held] / stats["counts"][held, None]
            present[cid] = held
        shared.update({"prototypes": means.astype(np.float32), "present": present})
    return shared


# ---- the add-on: both halves wired to the engine -----------------------------------------------
class Ggeur(AddOn):
    """Class statistics before round 1, pooled shapes in every training message, class top-up
    on every client."""

    name = "ggeur"
    Params = GgeurSection

    # ---- setup phase ---------------------------------------------------------------------
    def client_setup(self, ctx: ClientContext, data: LocalData) -> Arrays:
        """Per class the count, sum and outer-product sum of the client's training features
        (classes under min_count withheld, optional Gaussian noise on the sums)."""
        p = self.params
        x = data.x_train.cpu().numpy().reshape(len(data.y_train), -1)
        counts, sums, outers = class_statistics(x, data.y_train.cpu().numpy(), ctx.num_classes)
        withheld = counts < p.min_count
        counts[withheld], sums[withheld], outers[withheld] = 0, 0, 0
        if p.noise_std > 0:
            rng = np.random.default_rng(derive_seed(ctx.seed, ctx.client_id, GGEUR_STREAM, 1))
            noise = rng.normal(0, p.noise_std, outers.shape)
            sums += rng.normal(0, p.noise_std, sums.shape) * (~withheld)[:, None]
            outers += (noise + noise.transpose(0, 2, 1)) / 2 * (~withheld)[:, None, None]
        return {"counts": counts, "sums": sums, "outers": outers}

    def server_setup(self, reports: dict[int, Arrays]) -> dict[str, Any]:
        p = self.params
        self.state = shapes_from_statistics(reports, self.run.num_clients, p.target, p.prototypes,
                                            p.target_rule)
        return {"clients": len(reports),
                "shapes_bytes_per_message": sum(a.nbytes for a in self.state.values())}

    # ---- server half ---------------------------------------------------------------------
    def broadcast(self, server_round: int, current: Arrays) -> Arrays:
        return dict(self.state)

    # ---- client half ---------------------------------------------------------------------
    def training_data(self, ctx: ClientContext, data: LocalData) -> LocalData:
        """The client's training set topped up (built once per set of shapes and settings in a
        process, then reused)."""
        shared = {k: v.cpu().numpy() for k, v in ctx.broadcast.items()}
        fingerprint = hashlib.sha1(b"".join(np.ascontiguousarray(shared[k]).tobytes()
                                            for k in sorted(shared)))
        p = self.params
        key = ("ggeur", ctx.client_id, fingerprint.hexdigest(), p.scaling, p.prototype_draws)
        if key not in ctx.cache:
            rng = np.random.default_rng(derive_seed(ctx.seed, ctx.client_id, GGEUR_STREAM))
            x, y = augmented_training_set(data.x_train.cpu().numpy(), data.y_train.cpu().numpy(),
                                          ctx.client_id, shared, rng, p.scaling, p.prototype_draws)
            device = data.x_train.device
            ctx.cache[key] = LocalData(torch.as_tensor(x, device=device), torch.as_tensor(y, device=device),
                                       data.x_test, data.y_test, None, data.z_test)
        return ctx.cache[key]
