"""Finished runs as the report reads them: a comparison folder's cells or loose run directories."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedsim.config import flat_keys
from fedsim.results import SUMMARY_FILE, read_table


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
    federation = run_dir / "federation.parquet"
    return RunRecord(
        run_dir=run_dir, variant=variant or config["strategy"]["name"], level=level,
        seed=int(config["experiment"]["seed"]), config=config,
        rounds=read_table(run_dir, "rounds"), clients=read_table(run_dir, "clients"),
        federation=pd.read_parquet(federation) if federation.is_file() else None,
        summary=json.loads((run_dir / SUMMARY_FILE).read_text()))


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Finished runs under `paths`: comparison folders (with cells.csv) or run directories."""
    runs, loose = [], []
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
            loose.append(_read(path))
        else:
            loose.extend(_read(p.parent) for p in sorted(path.glob(f"*/{SUMMARY_FILE}")))
    _label_loose_runs(loose)  # a comparison's cells keep the levels of its grid
    return runs + loose


NOT_A_LEVEL = ("experiment.seed", "experiment.name", "strategy.", "output.", "engine.")


def _label_loose_runs(runs: list[RunRecord]) -> None:
    """Runs given one by one: their level is the config keys that differ between them, other
    than the seed, the strategy and where or how they ran."""
    flats = [flat_keys(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f if not k.startswith(NOT_A_LEVEL)
                   and len({json.dumps(g.get(k)) for g in flats}) > 1})
    for run, flat in zip(runs, flats, strict=True):
        run.level = ", ".join(f"{k.rsplit('.', 1)[-1]}={flat.get(k)}" for k in keys)
