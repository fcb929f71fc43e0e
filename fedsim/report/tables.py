"""The report's summary table: per (level, variant) mean and std over seeds, best marked."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from fedsim.evaluation import spread
from fedsim.report.runs import RunRecord


def rounds_to_target(rounds: pd.DataFrame, target: float) -> float:
    if "test_accuracy" not in rounds:  # a deployment without a server-side test set
        return float("nan")
    hit = rounds[rounds["test_accuracy"] >= target]
    return float(hit["round"].iloc[0]) if len(hit) else float("nan")


def client_accuracy(run: RunRecord, column: str = "eval_accuracy") -> np.ndarray:
    """Local test accuracy of each client evaluated in the last round that had client evaluation
    (of the global model, or with column = "personal_accuracy" of its personal model)."""
    if run.clients.empty or column not in run.clients:
        return np.array([])
    evaluated = run.clients.dropna(subset=[column])
    if evaluated.empty:
        return np.array([])
    return evaluated[evaluated["round"] == evaluated["round"].max()][column].to_numpy()


def run_metrics(run: RunRecord, target: float) -> dict[str, float]:
    """A run's row of the summary table (epsilon only for runs with differential privacy)."""
    clients = spread(client_accuracy(run))
    metrics = {"final accuracy": run.summary["final_accuracy"], "best accuracy": run.summary["best_accuracy"],
               "rounds to target": rounds_to_target(run.rounds, target),
               "client acc. mean": clients["mean"], "client acc. std": clients["std"],
               "client acc. worst 10%": clients["worst10"],
               "MB exchanged": float(run.rounds["bytes_exchanged"].sum()) / 1e6,
               "wall seconds": run.summary["seconds"]}
    for column, name in OPTIONAL_COLUMNS.items():
        if column in run.rounds and run.rounds[column].notna().any():
            metrics[name] = float(run.rounds[column].dropna().iloc[-1])
    return metrics


# rounds.parquet columns that join the summary (their last value) when a run has them
OPTIONAL_COLUMNS = {"dp_epsilon": "epsilon", "dp_sgd_epsilon": "example epsilon",
                    "test_accuracy_many": "acc. many", "test_accuracy_medium": "acc. medium",
                    "test_accuracy_few": "acc. few", "pseudo_label_accuracy": "pseudo-label acc.",
                    "personal_accuracy_mean": "personal acc. mean",
                    "personal_accuracy_worst10": "personal acc. worst 10%",
                    "personal_accuracy_std": "personal acc. std",
                    "personal_accuracy_many": "personal acc. many",
                    "personal_accuracy_medium": "personal acc. medium",
                    "personal_accuracy_few": "personal acc. few"}
LOWER_IS_BETTER = {"rounds to target", "client acc. std", "personal acc. std", "MB exchanged",
                   "wall seconds", "epsilon", "example epsilon"}
PERCENT = {"final accuracy", "best accuracy", "client acc. mean", "client acc. std", "client acc. worst 10%",
           "acc. many", "acc. medium", "acc. few", "pseudo-label acc.", *(
               name for name in OPTIONAL_COLUMNS.values() if name.startswith("personal"))}


def summary_table(runs: list[RunRecord], target: float) -> pd.DataFrame:
    """Mean and std over seeds of each metric, per (level, variant)."""
    rows = [{"level": r.level, "variant": r.variant, **run_metrics(r, target)} for r in runs]
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["level", "variant"], sort=False)
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table["seeds"] = grouped.size()
    return table.reset_index()


def decimals_for(metric: str, mean: float) -> int:
    """Decimals shown for a metric's mean and its std alike: one for percentages and rounds,
    else about three significant digits (at most three decimals)."""
    if metric in PERCENT or metric == "rounds to target" or mean == 0:
        return 1
    return int(min(3, max(0, 2 - np.floor(np.log10(abs(mean))))))


def mean_std_text(metric: str, mean: float, std: float) -> str:
    """`mean ± std` for reading: accuracies in percent, the std with the mean's precision."""
    if np.isnan(mean):
        return "-"
    scale = 100.0 if metric in PERCENT else 1.0
    decimals = decimals_for(metric, mean)
    text = f"{mean * scale:.{decimals}f}"
    return text if np.isnan(std) else f"{text} &plusmn; {std * scale:.{decimals}f}"


def heading(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT else metric


def extra_text(column: str, value: float) -> str:
    """A published value (in its metric's units) or a gap in seed-to-seed stds."""
    if np.isnan(value):
        return "-"
    if column.endswith(" gap (stds)"):
        return f"{value:+.1f}"
    metric = column.removeprefix("published ")
    return f"{value * (100.0 if metric in PERCENT else 1.0):.{decimals_for(metric, value)}f}"


def table_html(table: pd.DataFrame) -> str:
    metrics = [c[:-5] for c in table.columns if c.endswith(" mean")]
    known = {"level", "variant", "seeds", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))}
    extras = [c for c in table.columns if c not in known]  # published values and gaps
    names = [heading(m) for m in ["level", "variant", *metrics]] + [
        f"{c} (%)" if c.removeprefix("published ") in PERCENT else c for c in extras] + ["seeds"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
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
                text = mean_std_text(m, row[f"{m} mean"], row[f"{m} std"])
                marked = m in best and row[f"{m} mean"] == best[m] and len(block) > 1
                cells.append(f"<td class='best'>{text}</td>" if marked else f"<td>{text}</td>")
            cells += [f"<td>{extra_text(c, row[c])}</td>" for c in extras]
            cells.append(f"<td>{int(row['seeds'])}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
