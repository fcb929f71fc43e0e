"""The run directory: resolved config, per-round and per-client tables, final model, log.

Tables are rewritten atomically after every round, so a crash keeps every finished round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.config import ExperimentConfig
from fedsim.errors import FedsimError

SUMMARY_FILE = "summary.json"  # written last: its presence marks a finished run


def default_run_dir(config: ExperimentConfig) -> Path:
    """`output.run_dir` if set, else `output.dir/<name>-<timestamp>-s<seed>` (made unique)."""
    if config.output.run_dir is not None:
        return config.output.run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = config.output.dir / f"{config.experiment.name}-{stamp}-s{config.experiment.seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)


class RunWriter:
    """Writes one run's results as they come in."""

    def __init__(self, run_dir: Path, config: ExperimentConfig) -> None:
        self.run_dir = Path(run_dir)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config.to_json_dict(), indent=2))
        except OSError as exc:
            raise FedsimError(f"cannot write the run directory {self.run_dir}: {exc.strerror or exc}; "
                              "choose a writable place with --set output.dir=... (or output.run_dir)"
                              ) from None

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        self.rounds.append(row)
        _write_parquet(self.rounds, self.run_dir / "rounds.parquet")
        if client_rows:
            self.clients.extend(client_rows)
            _write_parquet(self.clients, self.run_dir / "clients.parquet")

    def save_federation(self, counts: np.ndarray, title: str = "") -> None:
        """The data split: per-client label counts, heterogeneity statistics, a heatmap."""
        from fedsim.data import stats

        stats.counts_table(counts).to_parquet(self.run_dir / "federation.parquet")
        summary = stats.summarize(counts)
        (self.run_dir / "federation.json").write_text(json.dumps(summary, indent=2))
        stats.write_heatmap(counts, self.run_dir / "federation.png", title)
        self.log("federation: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))

    def save_json(self, name: str, data: dict[str, Any]) -> None:
        (self.run_dir / name).write_text(json.dumps(data, indent=2))

    def save_model(self, arrays: dict[str, np.ndarray]) -> None:
        np.savez(self.run_dir / "model.npz", **arrays)

    def finish(self, rounds: pd.DataFrame, seconds: float) -> None:
        """Mark the run complete: `summary.json` with the final and best test accuracy (the
        clients' local accuracy when the server has no test set)."""
        column = "test_accuracy" if "test_accuracy" in rounds else "client_eval_accuracy"
        accuracy = rounds[column].dropna() if column in rounds else pd.Series(dtype=float)
        summary = {"rounds": int(rounds["round"].max()), "seconds": seconds,
                   "final_accuracy": float(accuracy.iloc[-1]) if len(accuracy) else float("nan"),
                   "best_accuracy": float(accuracy.max()) if len(accuracy) else float("nan")}
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self.log(f"done in {seconds:.1f} s")

    def log(self, line: str) -> None:
        with open(self.run_dir / "log.txt", "a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")
