"""Weighted sums and means of named arrays, accumulated in float64 and cast back at the end."""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def add_weighted(total: Arrays | None, arrays: Arrays, weight: float) -> Arrays:
    """Return `total + weight * arrays` (float64), starting a new sum when total is None."""
    if total is None:
        return {k: np.asarray(v, dtype=np.float64) * weight for k, v in arrays.items()}
    for key, value in arrays.items():
        total[key] += np.asarray(value, dtype=np.float64) * weight
    return total


def add_sums(total: Arrays | None, sums: Arrays) -> Arrays:
    """Return `total + sums` for sums already weighted."""
    return add_weighted(total, sums, 1.0)


def mean_from_sum(sums: Arrays, total_weight: float, like: Arrays) -> Arrays:
    """Divide a weighted sum by its total weight; each array takes the dtype of `like`'s."""
    out = {}
    for key, value in sums.items():
        mean = value / total_weight
        dtype = like[key].dtype if key in like else np.float32
        out[key] = np.rint(mean).astype(dtype) if np.issubdtype(dtype, np.integer) else mean.astype(dtype)
    return out
