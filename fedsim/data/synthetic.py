"""FedProx Synthetic(alpha, beta): every client's data is generated from its own seeded stream."""

from __future__ import annotations

import numpy as np

from fedsim.config import SyntheticSection


class SyntheticClients:
    """A population of natural clients; any client's data is a pure function of (seed, client id).

    Client k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k, b_k has entries
    ~ N(u_k, 1), its inputs x ~ N(v_k, diag(j^-1.2)) with v_k ~ N(B_k, 1), and its labels are
    argmax(x W_k + b_k). The IID variant shares one W, b ~ N(0, 1) and uses v_k = 0.
    Sizes are floor(LogNormal(4, 2)) + 50, optionally capped.
    """

    def __init__(self, spec: SyntheticSection, num_clients: int, seed: int) -> None:
        self.spec = spec
        self.num_clients = num_clients
        self.seed = seed
        sizes_rng = np.random.default_rng([seed, 0x5A7E5])
        sizes = sizes_rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
        if spec.max_client_size is not None:
            sizes = np.minimum(sizes, spec.max_client_size)
        self.sizes = sizes
        self._feature_std = np.arange(1, spec.dim + 1, dtype=np.float64) ** (-1.2 / 2)

    def _model(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d, c = self.spec.dim, self.spec.num_classes
        if self.spec.iid:
            shared = np.random.default_rng([self.seed, 0x11D])
            return shared.normal(0, 1, (d, c)), shared.normal(0, 1, c), np.zeros(d)
        u_k = rng.normal(0, self.spec.alpha)
        b_k = rng.normal(0, self.spec.beta)
        weights, bias = rng.normal(u_k, 1, (d, c)), rng.normal(u_k, 1, c)
        return weights, bias, rng.normal(b_k, 1, d)

    def generate(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """All examples of one client: float32 inputs (n, dim) and int64 labels (n,)."""
        rng = np.random.default_rng([self.seed, 0xC11E, client_id])
        weights, bias, mean = self._model(rng)
        n = int(self.sizes[client_id])
        x = mean + rng.standard_normal((n, self.spec.dim)) * self._feature_std
        y = np.argmax(x @ weights + bias, axis=1)
        return x.astype(np.float32), y.astype(np.int64)
