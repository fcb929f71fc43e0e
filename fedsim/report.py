"""One self-contained HTML report over runs or a comparison folder, from stored results only.

Runs are grouped into panels by heterogeneity level (the grid values other than the variant and
the seed) and into lines by variant; seeds give the mean and a min-max band. Plots are inline SVG,
so the file works offline and prints.
"""

from __future__ import annotations

import html
import io
import json
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.fairness.aglfop import aglfop_frontier
from fedsim.fairness.groups import counts_from_metrics
from fedsim.results import SUMMARY_FILE

PACKAGES = ["fedsim", "flwr", "flwr-datasets", "torch", "ray", "numpy", "pandas"]


@dataclass
class RunRecord:
    """What the report needs of one finished run."""

    run_dir: Path
    variant: str
    level: str
    seed: int
    config: dict
    rounds: pd.DataFrame
    clients: pd.DataFrame
    federation: pd.DataFrame | None
    summary: dict = field(default_factory=dict)


def _read(run_dir: Path, variant: str | None = None, level: str = "") -> RunRecord:
    config = json.loads((run_dir / "config.json").read_text())
    clients = run_dir / "clients.parquet"
    federation = run_dir / "federation.parquet"
    return RunRecord(
        run_dir=run_dir, variant=variant or config["strategy"]["name"], level=level,
        seed=int(config["experiment"]["seed"]), config=config,
        rounds=pd.read_parquet(run_dir / "rounds.parquet"),
        clients=pd.read_parquet(clients) if clients.is_file() else pd.DataFrame(),
        federation=pd.read_parquet(federation) if federation.is_file() else None,
        summary=json.loads((run_dir / SUMMARY_FILE).read_text()))


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Finished runs under `paths`: comparison folders (with cells.csv) or run directories."""
    runs = []
    for path in paths:
        cells = path / "cells.csv"
        if cells.is_file():
            table = pd.read_csv(cells)
            grid = [c for c in table.columns if c not in
                    ("cell", "variant", "seed", "status", "error", "rounds", "seconds",
                     "final_accuracy", "best_accuracy")]
            for _, row in table[table["status"] == "done"].iterrows():
                level = ", ".join(f"{k}={row[k]}" for k in grid)
                variant = row["variant"] if isinstance(row["variant"], str) else None
                runs.append(_read(path / row["cell"], variant, level))
        elif (path / SUMMARY_FILE).is_file():
            runs.append(_read(path))
        else:
            runs.extend(_read(p.parent) for p in sorted(path.glob(f"*/{SUMMARY_FILE}")))
    _label_loose_runs([r for r in runs if not r.level])
    return runs


NOT_A_LEVEL = ("experiment.seed", "experiment.name", "strategy.", "output.", "engine.")


def _label_loose_runs(runs: list[RunRecord]) -> None:
    """Runs given one by one: their level is the config keys that differ between them, other
    than the seed, the strategy and where or how they ran."""
    flats = [_flat(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f if not k.startswith(NOT_A_LEVEL)
                   and len({json.dumps(g.get(k)) for g in flats}) > 1})
    for run, flat in zip(runs, flats, strict=True):
        run.level = ", ".join(f"{k.rsplit('.', 1)[-1]}={flat.get(k)}" for k in keys)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- tables ----------------------------------------------------------------------------------
def rounds_to_target(rounds: pd.DataFrame, target: float) -> float:
    hit = rounds[rounds["test_accuracy"] >= target]
    return float(hit["round"].iloc[0]) if len(hit) else float("nan")


def client_accuracy(run: RunRecord) -> np.ndarray:
    """Local test accuracy of each client evaluated in the last round that had client evaluation."""
    if run.clients.empty or "eval_accuracy" not in run.clients:
        return np.array([])
    evaluated = run.clients.dropna(subset=["eval_accuracy"])
    if evaluated.empty:
        return np.array([])
    return evaluated[evaluated["round"] == evaluated["round"].max()]["eval_accuracy"].to_numpy()


def run_metrics(run: RunRecord, target: float) -> dict[str, float]:
    accuracy = client_accuracy(run)
    worst = np.sort(accuracy)[:max(1, len(accuracy) // 10)] if len(accuracy) else accuracy
    return {"final accuracy": run.summary["final_accuracy"], "best accuracy": run.summary["best_accuracy"],
            "rounds to target": rounds_to_target(run.rounds, target),
            "client acc. mean": float(accuracy.mean()) if len(accuracy) else np.nan,
            "client acc. std": float(accuracy.std()) if len(accuracy) else np.nan,
            "client acc. worst 10%": float(worst.mean()) if len(worst) else np.nan,
            "MB exchanged": float(run.rounds["bytes_exchanged"].sum()) / 1e6,
            "wall seconds": run.summary["seconds"]}


LOWER_IS_BETTER = {"rounds to target", "client acc. std", "MB exchanged", "wall seconds"}


def summary_table(runs: list[RunRecord], target: float) -> pd.DataFrame:
    """Mean and std over seeds of each metric, per (level, variant)."""
    rows = [{"level": r.level, "variant": r.variant, **run_metrics(r, target)} for r in runs]
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["level", "variant"], sort=False)
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table["seeds"] = grouped.size()
    return table.reset_index()


def _cell(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "-"
    return f"{mean:.4g}" + ("" if np.isnan(std) else f" &plusmn; {std:.2g}")


def table_html(table: pd.DataFrame) -> str:
    metrics = [c[:-5] for c in table.columns if c.endswith(" mean")]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ["level", "variant", *metrics, "seeds"])
    body = []
    for level, block in table.groupby("level", sort=False):
        best = {}
        for m in metrics:
            values = block[f"{m} mean"]
            if values.notna().any():
                best[m] = values.min() if m in LOWER_IS_BETTER else values.max()
        for _, row in block.iterrows():
            cells = [f"<td>{html.escape(str(level))}</td>", f"<td>{html.escape(row['variant'])}</td>"]
            for m in metrics:
                text = _cell(row[f"{m} mean"], row[f"{m} std"])
                marked = m in best and row[f"{m} mean"] == best[m] and len(block) > 1
                cells.append(f"<td class='best'>{text}</td>" if marked else f"<td>{text}</td>")
            cells.append(f"<td>{int(row['seeds'])}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ---- plots -----------------------------------------------------------------------------------
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


def _levels(runs: list[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.level for r in runs))


def _variants(runs: list[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in runs))


def curves_svg(runs: list[RunRecord], columns: list[tuple[str, str]]) -> str:
    """Per-round metrics: one row per (column, label), one panel per level, mean and band over seeds."""
    plt = _pyplot()
    levels, variants = _levels(runs), _variants(runs)
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


def client_boxes_svg(runs: list[RunRecord]) -> str | None:
    plt = _pyplot()
    levels, variants = _levels(runs), _variants(runs)
    data = {(lv, v): np.concatenate([client_accuracy(r) for r in runs if r.level == lv and r.variant == v])
            for lv in levels for v in variants}
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

    shown = [next(r for r in runs if r.level == lv) for lv in _levels(runs)]
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
    levels = [lv for lv in _levels(runs) if any(
        r.level == lv and final_client_counts(r) is not None for r in runs)]
    if not levels:
        return None
    variants = _variants(runs)
    fig, axes = plt.subplots(1, len(levels), figsize=(3.8 * len(levels), 3.0), squeeze=False, sharey=True)
    for col, level in enumerate(levels):
        ax = axes[0][col]
        members = [r for r in runs if r.level == level and final_client_counts(r) is not None]
        frontier = aglfop_frontier(final_client_counts(members[0]), GLOBAL_BUDGETS, LOCAL_BUDGETS)
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


# ---- the page --------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def config_differences(runs: list[RunRecord]) -> tuple[dict, list[tuple[str, dict]]]:
    """The first run's config, and for every run the keys where it differs from it."""
    base = _flat(runs[0].config)
    diffs = []
    for run in runs:
        mine = _flat(run.config)
        diffs.append((run.run_dir.name, {k: v for k, v in mine.items()
                                         if base.get(k) != v and k != "output.run_dir"}))
    return runs[0].config, diffs


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.meta{color:#666} table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{padding:.3em .6em;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6;position:sticky;top:0} td:first-child,td:nth-child(2),th:first-child,
th:nth-child(2){text-align:left}
td.best{font-weight:700;background:#eef6ee} figure{margin:1em 0;overflow-x:auto}
figure svg{max-width:100%;height:auto} summary{cursor:pointer;margin:.5em 0}
pre{background:#f8f8f8;padding:1em;font-size:.8em;overflow-x:auto}
@media print{figure{break-inside:avoid} th{position:static} details{display:block}}
"""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def build_report(paths: list[Path], out: Path, title: str = "fedsim report",
                 target: float | None = None) -> Path:
    """Write `out` (HTML) and `out`'s summary table as CSV beside it; returns the HTML path."""
    runs = collect_runs([Path(p) for p in paths])
    if not runs:
        raise FileNotFoundError(f"no finished runs under {', '.join(map(str, paths))}")
    if target is None:  # 90% of the best mean final accuracy reached by any variant
        target = round(0.9 * max(r.summary["final_accuracy"] for r in runs), 3)
    table = summary_table(runs, target)
    table.to_csv(out.with_suffix(".csv"), index=False)
    sections = [
        f"<h2>Summary</h2><p>Mean &plusmn; std over seeds; best per level in bold. Target accuracy "
        f"for <i>rounds to target</i>: {target:.3f}. Client accuracies are the local test splits in "
        f"the last round with client evaluation.</p>{table_html(table)}",
        "<h2>Test accuracy and loss per round</h2><p>Lines: mean over seeds; bands: min to max.</p>"
        f"<figure>{curves_svg(runs, [('test_accuracy', 'test accuracy'), ('test_loss', 'test loss')])}"
        "</figure>"]
    boxes = client_boxes_svg(runs)
    if boxes:
        sections.append(f"<h2>Per-client accuracy of the final models</h2><figure>{boxes}</figure>")
    hetero = heterogeneity_svg(runs)
    if hetero:
        sections.append("<h2>The federations</h2><p>Label counts per client (first seed of each level, "
                        f"at most 100 clients) and client sizes.</p><figure>{hetero}</figure>")
    if any("decomp_local" in r.rounds for r in runs):
        sections.append("<h2>Loss decomposition</h2><p>F(aggregate) = local + distribution shift + "
                        "aggregation loss, on the clients' training data, at each evaluation round.</p>"
                        f"<figure>{curves_svg(runs, DECOMPOSITION)}</figure>")
    if any("pid_global_disparity" in r.rounds for r in runs):
        sections.append("<h2>Group fairness</h2><p>Statistical-parity gaps |P(yhat=1|z=1) - "
                        "P(yhat=1|z=0)| over all clients' test splits (global) and within clients "
                        "(size-weighted mean), and the partial information decomposition of the "
                        "disparity: global = unique + redundant, local = unique + masked. Plug-in "
                        "mutual information is biased upward on small counts.</p>"
                        f"<figure>{curves_svg(runs, FAIRNESS)}</figure>")
        frontier = frontier_svg(runs)
        if frontier:
            sections.append("<h3>Accuracy / fairness frontier (AGLFOP)</h3><p>Lines: the best "
                            "accuracy any predictor can reach on the clients' test data under a "
                            "global and a local disparity budget (no model constraint, so it reaches "
                            "1 without budgets). Points: each run's final (global disparity, client "
                            f"accuracy).</p><figure>{frontier}</figure>")
    base, diffs = config_differences(runs)
    diff_rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(json.dumps(d))}</td></tr>"
                        for name, d in diffs)
    sections.append(
        "<h2>Reproducibility</h2><p>Software: " + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f"</p><details><summary>Base configuration ({html.escape(runs[0].run_dir.name)})</summary>"
        f"<pre>{html.escape(json.dumps(base, indent=2))}</pre></details><p>Each run's differences:</p>"
        f"<table><thead><tr><th>run</th><th>differs in</th></tr></thead><tbody>{diff_rows}</tbody></table>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{_count(len(runs), 'run')}, {_count(len(_variants(runs)), 'variant')}, "
            f"{_count(len(_levels(runs)), 'heterogeneity level')}</p>{''.join(sections)}</body></html>")
    out.write_text(page)
    return out
