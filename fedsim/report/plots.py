"""The report's figures as inline SVG (matplotlib, no network)."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd

from fedsim.fairness.aglfop import aglfop_frontier
from fedsim.fairness.groups import counts_from_metrics
from fedsim.report.runs import RunRecord
from fedsim.report.tables import client_accuracy


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                                "axes.spines.right": False})
    from matplotlib import pyplot as plt

    return plt


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    _pyplot().close(fig)
    text = buffer.getvalue()
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)


def levels_of(runs: list[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.level for r in runs))


def variants_of(runs: list[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in runs))


def curves_svg(runs: list[RunRecord], columns: list[tuple[str, str]]) -> str:
    """Per-round metrics: one row per (column, label), one panel per level, mean and band over seeds."""
    plt = _pyplot()
    levels, variants = levels_of(runs), variants_of(runs)
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    single = len(levels) == 1  # then the metrics sit side by side
    shape = (1, len(columns)) if single else (len(columns), len(levels))
    fig, axes = plt.subplots(*shape, figsize=(3.6 * shape[1], 2.6 * shape[0]), squeeze=False,
                             sharey=False if single else "row")  # levels share each metric's scale
    for col, level in enumerate(levels):
        for row, (column, label) in enumerate(columns):
            ax = axes[0][row] if single else axes[row][col]
            for variant in variants:
                frames = [r.rounds.set_index("round")[column].dropna() for r in runs
                          if r.level == level and r.variant == variant and column in r.rounds]
                frames = [f for f in frames if len(f)]
                if not frames:
                    continue
                stacked = pd.concat(frames, axis=1)
                ax.plot(stacked.index, stacked.mean(axis=1), color=colors[variant], label=variant, lw=1.5)
                if stacked.shape[1] > 1:
                    ax.fill_between(stacked.index, stacked.min(axis=1), stacked.max(axis=1),
                                    color=colors[variant], alpha=0.18, lw=0)
            ax.set_ylabel(label)
            if row == 0 or single:
                ax.set_title(level or "all runs")
            if row == len(columns) - 1 or single:
                ax.set_xlabel("round")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    return _svg(fig)


def client_boxes_svg(runs: list[RunRecord], column: str = "eval_accuracy") -> str | None:
    """Boxes of the clients' final local test accuracy (`column` of clients.parquet) per level
    and variant."""
    plt = _pyplot()
    levels, variants = levels_of(runs), variants_of(runs)
    data = {(lv, v): np.concatenate([np.zeros(0), *(client_accuracy(r, column) for r in runs
                                                    if r.level == lv and r.variant == v)])
            for lv in levels for v in variants}  # a (level, variant) without runs stays empty
    if not any(len(a) for a in data.values()):
        return None
    fig, axes = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 2.8), squeeze=False, sharey=True)
    for col, level in enumerate(levels):
        ax = axes[0][col]
        present = [v for v in variants if len(data[(level, v)])]
        ax.boxplot([data[(level, v)] for v in present], tick_labels=present, showfliers=True)
        ax.set_title(level or "all runs")
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].set_ylabel("client test accuracy (final)")
    fig.tight_layout()
    return _svg(fig)


def heterogeneity_svg(runs: list[RunRecord]) -> str | None:
    """For each level, the first run's clients x classes label counts and its size distribution."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    shown = [next(r for r in runs if r.level == lv) for lv in levels_of(runs)]
    shown = [r for r in shown if r.federation is not None]
    if not shown:
        return None
    fig, axes = plt.subplots(2, len(shown), figsize=(3.6 * len(shown), 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3]})
    for col, run in enumerate(shown):
        counts = run.federation[[c for c in run.federation.columns if c.startswith("class_")]].to_numpy()
        image = axes[0][col].imshow(counts[:100], aspect="auto", cmap="viridis", interpolation="nearest")
        axes[0][col].set_title(run.level or run.variant)
        axes[0][col].set_xlabel("class")
        axes[0][col].set_ylabel("client")
        for axis in (axes[0][col].xaxis, axes[0][col].yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=axes[0][col], fraction=0.05)
        axes[1][col].hist(run.federation["size"], bins=20, color="grey")
        axes[1][col].set_xlabel("client size (training examples)")
    fig.tight_layout()
    return _svg(fig)


ROBUST_COLUMN = re.compile(r"robust_(?P<attack>[a-z0-9]+)_accuracy_eps(?P<eps>[0-9.e+-]+)$")


def final_value(run: RunRecord, column: str) -> float:
    """A run's last recorded value of a per-round metric (NaN when it never recorded one)."""
    if column not in run.rounds:
        return float("nan")
    values = run.rounds[column].dropna()
    return float(values.iloc[-1]) if len(values) else float("nan")


def robustness_svg(runs: list[RunRecord]) -> str | None:
    """Per level: the final global model's accuracy against the attack size eps, one line per
    variant and attack (PGD solid, FGSM dashed; eps 0: the same examples unattacked), mean over
    seeds with min-max bars."""
    columns = sorted({c for r in runs for c in r.rounds.columns if ROBUST_COLUMN.match(c)})
    if not columns:
        return None
    plt = _pyplot()
    levels, variants = levels_of(runs), variants_of(runs)
    attacks = sorted({ROBUST_COLUMN.match(c)["attack"] for c in columns})
    styles = {attack: ["-", "--", ":", "-."][i % 4] for i, attack in enumerate(attacks)}
    fig, axes = plt.subplots(1, len(levels), figsize=(3.8 * len(levels), 3.0), squeeze=False, sharey=True)
    for col, level in enumerate(levels):
        ax = axes[0][col]
        for i, variant in enumerate(variants):
            members = [r for r in runs if r.level == level and r.variant == variant]
            for attack in attacks:
                points = sorted((float(ROBUST_COLUMN.match(c)["eps"]), c) for c in columns
                                if ROBUST_COLUMN.match(c)["attack"] == attack)
                curve = [(0.0, "robust_clean_accuracy"), *points]
                values = np.array([[final_value(r, c) for _, c in curve] for r in members])
                if not len(values) or np.isnan(values[:, 1:]).all():
                    continue
                eps = [e for e, _ in curve]
                mean = np.nanmean(values, axis=0)
                spread = [mean - np.nanmin(values, axis=0), np.nanmax(values, axis=0) - mean]
                ax.errorbar(eps, mean, yerr=spread, color=f"C{i}", ls=styles[attack], marker="o",
                            ms=3, lw=1.3, capsize=2, label=f"{variant} ({attack.upper()})")
        ax.set_title(level or "all runs")
        ax.set_xlabel("attack size eps")
    axes[0][0].set_ylabel("test accuracy under attack")
    axes[0][-1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return _svg(fig)


def labelled_fraction(run: RunRecord) -> float:
    """A run's share of labelled training data (`data.labels.fraction`; 1 without the section)."""
    return float(run.config.get("data", {}).get("labels", {}).get("fraction", 1.0))


def labels_svg(runs: list[RunRecord]) -> str | None:
    """Final test accuracy against the labelled share, one line per variant (mean over seeds,
    min-max bars); None unless the runs span at least two shares."""
    fractions = sorted({labelled_fraction(r) for r in runs})
    if len(fractions) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.0))
    for i, variant in enumerate(variants_of(runs)):
        points = []
        for fraction in fractions:
            finals = [r.summary["final_accuracy"] for r in runs
                      if r.variant == variant and labelled_fraction(r) == fraction]
            if finals:
                points.append((fraction, np.mean(finals), np.min(finals), np.max(finals)))
        if points:
            x, mean, low, high = map(np.array, zip(*points, strict=True))
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], color=f"C{i}", marker="o", ms=3,
                        lw=1.3, capsize=2, label=variant)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled share of the training data")
    ax.set_ylabel("final test accuracy")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return _svg(fig)


PSEUDO_LABELS = [("pseudo_label_accuracy", "pseudo-label accuracy"),
                 ("pseudo_label_coverage", "pseudo-label coverage"),
                 ("pseudo_local_share", "share from the local model")]
PERSONAL = [("personal_accuracy_mean", "personal accuracy, mean"),
            ("personal_accuracy_worst10", "personal accuracy, worst 10%")]
DECOMPOSITION = [("decomp_local", "local loss"), ("decomp_shift", "shift loss"),
                 ("decomp_aggregation", "aggregation loss")]
FAIRNESS = [("fair_global_sp_gap", "global SP gap"), ("fair_local_sp_gap_mean", "local SP gap (mean)"),
            ("pid_unique", "unique (bits)"), ("pid_redundant", "redundant (bits)"),
            ("pid_masked", "masked (bits)")]


GLOBAL_BUDGETS = [0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
LOCAL_BUDGETS = [0.01, 0.05, 10.0]


def final_client_counts(run: RunRecord) -> np.ndarray | None:
    """Sum over clients of n(s, z, y) from the last client evaluation (shape (S, Z, Y))."""
    if run.clients.empty:
        return None
    columns = [c for c in run.clients.columns if c.startswith("fair_n_")]
    evaluated = run.clients.dropna(subset=columns[:1]) if columns else run.clients.iloc[:0]
    if evaluated.empty:
        return None
    last = evaluated[evaluated["round"] == evaluated["round"].max()]
    per_client = [counts_from_metrics(row) for row in last[columns].to_dict("records")]
    return np.stack([c.sum(axis=2) for c in per_client])


def frontier_svg(runs: list[RunRecord]) -> str | None:
    """Per level: the AGLFOP frontier (best accuracy vs global budget, one line per local budget)
    on the first run's client data, and each run's achieved (global disparity, accuracy)."""
    plt = _pyplot()
    variants = variants_of(runs)  # colours as in the other figures
    counts = {id(r): final_client_counts(r) for r in runs}
    runs = [r for r in runs if counts[id(r)] is not None]
    levels = levels_of(runs)
    if not levels:
        return None
    fig, axes = plt.subplots(1, len(levels), figsize=(3.8 * len(levels), 3.0), squeeze=False, sharey=True)
    for col, level in enumerate(levels):
        ax = axes[0][col]
        members = [r for r in runs if r.level == level]
        frontier = aglfop_frontier(counts[id(members[0])], GLOBAL_BUDGETS, LOCAL_BUDGETS)
        for j, budget in enumerate(LOCAL_BUDGETS):
            label = "local budget unlimited" if budget >= 10 else f"local budget {budget} bits"
            ax.plot(GLOBAL_BUDGETS, frontier[:, j], color="grey", lw=1, ls=["--", ":", "-"][j], label=label)
        for i, variant in enumerate(variants):
            points = [(r.rounds["pid_global_disparity"].dropna().iloc[-1],
                       r.rounds["client_eval_accuracy"].dropna().iloc[-1])
                      for r in members if r.variant == variant and "pid_global_disparity" in r.rounds]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, color=f"C{i}", label=variant, zorder=3, s=18)
        ax.set_xscale("symlog", linthresh=0.002)
        ax.set_title(level or "all runs")
        ax.set_xlabel("global disparity I(Z;Yhat) (bits)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(frameon=False, fontsize=7, loc="lower right")
    fig.tight_layout()
    return _svg(fig)
