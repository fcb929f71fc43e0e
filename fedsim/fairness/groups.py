"""Group fairness from confusion counts n(z, y, yhat): clients report counts, the server computes
statistical-parity and equalized-odds gaps, globally and per client, and the PID of disparity."""

from __future__ import annotations

import re

import numpy as np


def group_confusion(y: np.ndarray, yhat: np.ndarray, z: np.ndarray, num_groups: int,
                    num_classes: int) -> np.ndarray:
    """Counts n(z, y, yhat) as an array of shape (num_groups, num_classes, num_classes)."""
    flat = (np.asarray(z) * num_classes + np.asarray(y)) * num_classes + np.asarray(yhat)
    return np.bincount(flat, minlength=num_groups * num_classes**2).reshape(
        num_groups, num_classes, num_classes).astype(np.float64)


def counts_to_metrics(counts: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Flat metric entries `<prefix>fair_n_<z>_<y>_<yhat>` for a client's reply."""
    return {f"{prefix}fair_n_{z}_{y}_{p}": float(counts[z, y, p]) for z, y, p in np.ndindex(counts.shape)}


def counts_from_metrics(metrics: dict[str, float], prefix: str = "") -> np.ndarray | None:
    """The counts array back from a reply's metrics (None when the client sent none)."""
    pattern = re.compile(rf"^{re.escape(prefix)}fair_n_(\d+)_(\d+)_(\d+)$")
    cells = {tuple(int(i) for i in m.groups()): value for key, value in metrics.items()
             if (m := pattern.match(key))}
    if not cells:
        return None
    shape = tuple(max(cell[axis] for cell in cells) + 1 for axis in range(3))
    counts = np.zeros(shape)
    for cell, value in cells.items():
        counts[cell] = value
    return counts


def _rate(counts: np.ndarray, group: int, label: int | None) -> float:
    """P(yhat = 1 | z = group[, y = label]) (NaN when the condition never occurs)."""
    block = counts[group] if label is None else counts[group, label][None]
    total = block.sum()
    return float(block[..., 1].sum() / total) if total > 0 else float("nan")


def parity_gaps(counts: np.ndarray) -> dict[str, float]:
    """|P(yhat=1|z=1) - P(yhat=1|z=0)| and the equalized-odds TPR and FPR gaps (binary z and y)."""
    return {"sp_gap": abs(_rate(counts, 1, None) - _rate(counts, 0, None)),
            "tpr_gap": abs(_rate(counts, 1, 1) - _rate(counts, 0, 1)),
            "fpr_gap": abs(_rate(counts, 1, 0) - _rate(counts, 0, 0))}


def fairness_metrics(per_client: dict[int, np.ndarray]) -> dict[str, float]:
    """Global and local gaps (max and size-weighted mean over the clients holding both groups;
    the others are counted as skipped) and the PID terms, from each client's counts."""
    shape = tuple(max(c.shape[a] for c in per_client.values()) for a in range(3))
    padded = {cid: np.pad(c, [(0, shape[a] - c.shape[a]) for a in range(3)]) for cid, c in per_client.items()}
    total = sum(padded.values())
    metrics = {f"fair_global_{k}": v for k, v in parity_gaps(total).items()}
    local = [(parity_gaps(c), c.sum()) for c in padded.values() if (c.sum(axis=(1, 2)) > 0).all()]
    metrics["fair_clients_skipped"] = float(len(padded) - len(local))
    for key in ("sp_gap", "tpr_gap", "fpr_gap"):
        pairs = [(gaps[key], size) for gaps, size in local if np.isfinite(gaps[key])]
        metrics[f"fair_local_{key}_max"] = max((g for g, _ in pairs), default=float("nan"))
        weight = sum(size for _, size in pairs)
        metrics[f"fair_local_{key}_mean"] = (sum(g * size for g, size in pairs) / weight
                                             if weight else float("nan"))
    joint = np.stack([c.sum(axis=1) for c in padded.values()])  # (S, Z, Yhat)
    if joint.sum() > 0:
        from fedsim.fairness.pid import pid_decomposition  # cvxpy: slow to import, server only

        metrics.update({f"pid_{k}": v for k, v in pid_decomposition(joint).items()})
    return metrics
