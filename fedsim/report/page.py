"""One self-contained HTML report over runs or a comparison folder, from stored results only.

Runs are grouped into panels by heterogeneity level (the grid values other than the variant and
the seed) and into lines by variant; seeds give the mean and a min-max band. Plots are inline SVG,
so the file works offline and prints.
"""

from __future__ import annotations

import html
import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from fedsim.config import flat_keys
from fedsim.report.plots import (
    DECOMPOSITION,
    FAIRNESS,
    PERSONAL,
    PSEUDO_LABELS,
    client_boxes_svg,
    curves_svg,
    frontier_svg,
    heterogeneity_svg,
    labels_svg,
    levels_of,
    robustness_svg,
    variants_of,
)
from fedsim.report.published import load_published, with_published
from fedsim.report.runs import RunRecord, collect_runs
from fedsim.report.tables import summary_table, table_html

PACKAGES = ["fedsim", "flwr", "flwr-datasets", "torch", "ray", "numpy", "pandas"]


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
    base = flat_keys(runs[0].config)
    diffs = []
    for run in runs:
        mine = flat_keys(run.config)
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
    if target is None:  # 90% of the best final accuracy of any run (none: no central test set)
        finals = np.array([r.summary["final_accuracy"] for r in runs], dtype=float)
        target = round(0.9 * float(np.nanmax(finals)), 3) if np.isfinite(finals).any() else np.nan
    published = load_published(paths)
    table = with_published(summary_table(runs, target), published)
    table.to_csv(out.with_suffix(".csv"), index=False)
    sources = "".join(f" Published ({html.escape(p.metric)}): {html.escape(p.source)}; the gap is "
                      "(measured - published) in seed-to-seed standard deviations." for p in published)
    sections = [
        f"<h2>Summary</h2><p>Mean &plusmn; std over seeds; best per level in bold. Target accuracy "
        f"for <i>rounds to target</i>: {target:.3f}. Client accuracies are the local test splits in "
        f"the last round with client evaluation.{sources}</p>{table_html(table)}",
        "<h2>Test accuracy and loss per round</h2><p>Lines: mean over seeds; bands: min to max.</p>"
        f"<figure>{curves_svg(runs, [('test_accuracy', 'test accuracy'), ('test_loss', 'test loss')])}"
        "</figure>"]
    boxes = client_boxes_svg(runs)
    if boxes:
        sections.append(f"<h2>Per-client accuracy of the final models</h2><figure>{boxes}</figure>")
    personal = client_boxes_svg(runs, "personal_accuracy")
    if personal:
        sections.append("<h2>Personal models</h2><p>Each client's personal model on its local test "
                        "split, for the variants that have one: mean and worst 10% of clients per "
                        "round, and every client in the last round with client evaluation.</p>"
                        f"<figure>{curves_svg(runs, PERSONAL)}</figure><figure>{personal}</figure>")
    hetero = heterogeneity_svg(runs)
    if hetero:
        sections.append("<h2>The federations</h2><p>Label counts per client (first seed of each level, "
                        f"at most 100 clients) and client sizes.</p><figure>{hetero}</figure>")
    labels = labels_svg(runs)
    if labels:
        sections.append("<h2>Accuracy and labels</h2><p>Final test accuracy against the share of "
                        "each client's training data that is labelled (data.labels.fraction); mean "
                        f"over seeds, bars from min to max.</p><figure>{labels}</figure>")
    if any("pseudo_label_accuracy" in r.rounds for r in runs):
        sections.append("<h2>Pseudo-labels per round</h2><p>Over all clients of a round: the share "
                        "of the pseudo-labels given that are right (scored against the labels the "
                        "clients never see), the share of unlabelled examples drawn that got one "
                        "(above the confidence threshold), and the share the local model gave.</p>"
                        f"<figure>{curves_svg(runs, PSEUDO_LABELS)}</figure>")
    robustness = robustness_svg(runs)
    if robustness:
        sections.append("<h2>Robustness and accuracy</h2><p>Accuracy of each variant's final global "
                        "model on the first evaluation.robust.examples examples of the central test set "
                        "under attacks of growing size (eps 0: the same examples unattacked); mean over "
                        f"seeds, bars from min to max.</p><figure>{robustness}"
                        "</figure>")
    if any("decomp_local" in r.rounds for r in runs):
        sections.append("<h2>Loss decomposition</h2><p>F(aggregate) = local + distribution shift + "
                        "aggregation loss, on the clients' training data, at each evaluation round.</p>"
                        f"<figure>{curves_svg(runs, DECOMPOSITION)}</figure>")
    if any("pid_global_disparity" in r.rounds for r in runs):
        where = sorted({r.config.get("evaluation", {}).get("fairness_data", "test") for r in runs})
        counted = " and ".join({"train": "training data", "test": "test splits"}[w] for w in where)
        sections.append("<h2>Group fairness</h2><p>Statistical-parity gaps |P(yhat=1|z=1) - "
                        f"P(yhat=1|z=0)| over all clients' {counted} (global) and within clients "
                        "(size-weighted mean), and the partial information decomposition of the "
                        "disparity: global = unique + redundant, local = unique + masked. Plug-in "
                        "mutual information is biased upward on small counts.</p>"
                        f"<figure>{curves_svg(runs, FAIRNESS)}</figure>")
        frontier = frontier_svg(runs)
        if frontier:
            sections.append("<h3>Accuracy / fairness frontier (AGLFOP)</h3><p>Lines: the best "
                            f"accuracy any predictor can reach on the clients' {counted} under a "
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
            f"<p class='meta'>{_count(len(runs), 'run')}, {_count(len(variants_of(runs)), 'variant')}, "
            f"{_count(len(levels_of(runs)), 'heterogeneity level')}</p>{''.join(sections)}</body></html>")
    out.write_text(page)
    return out
