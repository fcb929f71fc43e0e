"""How heterogeneous a federation is: per-client label counts, summary statistics, a heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.data.federation import Federation, IndexedFederation

MAX_NATURAL_CLIENTS = 1000  # natural clients generate their data; count only this many


def label_counts(fed: Federation) -> np.ndarray:
    """Training-label counts, one row per client (for natural clients, the first 1000)."""
    if isinstance(fed, IndexedFederation):
        labels = fed.dataset.y_train
        return np.stack([np.bincount(labels[idx], minlength=fed.num_classes) for idx in fed.train_idx])
    clients = range(min(fed.num_clients, MAX_NATURAL_CLIENTS))
    return np.stack([np.bincount(fed.client_data(k).y_train, minlength=fed.num_classes) for k in clients])


def summarize(counts: np.ndarray) -> dict[str, float]:
    """Size statistics, mean classes per client, and the mean total-variation distance between
    each client's label distribution and the pooled one (0 = IID labels, 1 = disjoint)."""
    sizes = counts.sum(axis=1)
    pooled = counts.sum(axis=0) / sizes.sum()
    shares = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(shares - pooled).sum(axis=1)
    return {"clients": float(len(sizes)), "examples": float(sizes.sum()),
            "size_mean": float(sizes.mean()), "size_std": float(sizes.std()),
            "size_min": float(sizes.min()), "size_max": float(sizes.max()),
            "classes_per_client": float((counts > 0).sum(axis=1).mean()),
            "label_tv_distance": float(tv[sizes > 0].mean())}


def counts_table(counts: np.ndarray) -> pd.DataFrame:
    """A clients x classes table with a size column, for printing and the run directory."""
    table = pd.DataFrame(counts, columns=[f"class_{c}" for c in range(counts.shape[1])])
    table.insert(0, "size", counts.sum(axis=1))
    table.index.name = "client_id"
    return table


def write_heatmap(counts: np.ndarray, path: Path, title: str = "") -> Path:
    """Save a clients x classes heatmap of label counts (PNG), with client sizes beside it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = counts[:200]  # beyond that rows are thinner than a pixel
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(9, 1.5 + 0.04 * len(shown) + 2),
                                     gridspec_kw={"width_ratios": [4, 1]}, sharey=True)
    image = heat.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set_xlabel("class")
    heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    clipped = f" (first {len(shown)} of {len(counts)})" if len(counts) > len(shown) else ""
    heat.set_ylabel("client" + clipped)
    fig.colorbar(image, ax=heat, label="training examples")
    bars.barh(np.arange(len(shown)), shown.sum(axis=1), color="grey")
    bars.set_xlabel("size")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
