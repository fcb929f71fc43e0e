"""Grid comparisons: one experiment plus a `[compare]` grid over config keys; every cell is a run.

    [compare]
    name = "baselines"                       # folder under output.dir (default: experiment.name)
    [compare.grid]                           # every combination of these values
    "data.partition.alpha" = [1.0, 0.1]
    "experiment.seed" = [0, 1, 2]
    [compare.variants.fedprox]               # named variants (a strategy with its parameters)
    "strategy.name" = "fedprox"
    "strategy.mu" = 0.01
    [compare.published]                      # optional: numbers a paper reports (see report.published)

Cells already finished in the output folder are skipped, so an interrupted comparison resumes;
a failed cell is recorded and the others go on. `cells.csv` lists every cell run or finished,
`summary.csv` the mean and std over seeds. A filter (`--only`) shares a grid's cells out among
processes or machines that write to one folder.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.config import ExperimentConfig, apply_overrides, read_toml, set_key, validate_config
from fedsim.errors import ConfigError
from fedsim.registry import check_config
from fedsim.report.published import parse_published, save_published
from fedsim.results import SUMMARY_FILE
from fedsim.tracking import check_installed, comparison_run

SEED_KEY = "experiment.seed"


@dataclass
class Cell:
    """One run of the grid: its variant, grid values, resolved config and run directory."""

    name: str
    variant: str
    values: dict[str, Any]
    config: ExperimentConfig

    @property
    def run_dir(self) -> Path:
        return self.config.output.run_dir

    @property
    def finished(self) -> bool:
        return (self.run_dir / SUMMARY_FILE).is_file()


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def cell_parts(variant: str, values: dict[str, Any]) -> list[str]:
    """The parts of a cell's name: its variant, then `key=value` per grid key (last dotted part)."""
    return ([variant] if variant else []) + [f"{_short(k)}={v}" for k, v in values.items()]


def cell_name(variant: str, values: dict[str, Any]) -> str:
    return "__".join(cell_parts(variant, values)) or "base"


def cell_filter(cells: list[Cell], only: list[str]) -> Callable[[Cell], bool]:
    """Which cells to run: those whose name has every part in `only` (a variant or a grid
    `key=value`, as in the cells' names); a part no cell has is a ConfigError."""
    known = {part for cell in cells for part in cell_parts(cell.variant, cell.values)}
    unknown = [part for part in only if part not in known]
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: no cell has it; this grid's parts are "
                          f"{', '.join(sorted(known))}")

    def chosen(cell: Cell) -> bool:
        return set(only) <= set(cell_parts(cell.variant, cell.values))

    if not any(chosen(cell) for cell in cells):
        raise ConfigError(f"--only {' '.join(only)}: no cell has all of these parts")
    return chosen


def load_comparison(path: Path, overrides: list[str] = ()) -> tuple[Path, list[Cell]]:
    """Read a comparison spec; returns its output folder and every cell, all validated up front."""
    raw = read_toml(path)
    spec = raw.pop("compare", None)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} has no [compare] section; `fedsim run` runs a single experiment")
    unknown = sorted(set(spec) - {"name", "grid", "variants", "published"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [compare]; allowed: name, grid, variants, published")
    base = apply_overrides(raw, list(overrides))
    grid: dict[str, list[Any]] = spec.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"compare.grid.\"{key}\" must be a non-empty list of values")
    variants: dict[str, dict[str, Any]] = spec.get("variants", {}) or {"": {}}
    name = spec.get("name") or validate_config(copy.deepcopy(base)).experiment.name
    folder = validate_config(copy.deepcopy(base)).output.dir / name
    cells = []
    for variant, settings in variants.items():
        for combo in itertools.product(*grid.values()):
            values = dict(zip(grid, combo, strict=True))
            cell_raw = copy.deepcopy(base)
            for key, value in [*settings.items(), *values.items()]:
                set_key(cell_raw, key, value)
            label = cell_name(variant, values)
            set_key(cell_raw, "output.run_dir", str(folder / label))
            try:
                config = validate_config(cell_raw)
                check_config(config)
                check_installed(config.output)
            except ConfigError as exc:
                raise ConfigError(f"cell {label}: {exc}") from None
            cells.append(Cell(label, variant, values, config))
    if "published" in spec:  # the report's variant names: the variants', else the strategy's
        names = [v for v in variants if v] or [cells[0].config.strategy.name]
        save_published(folder, parse_published(spec["published"], names))
    return folder, cells


def cell_row(cell: Cell, status: str, error: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"cell": cell.name, "variant": cell.variant,
                           **{_short(k): v for k, v in cell.values.items()}, "status": status}
    if status == "done":
        row.update(json.loads((cell.run_dir / SUMMARY_FILE).read_text()))
    if error:
        row["error"] = error
    return row


def summarize_cells(cells: pd.DataFrame, grid_keys: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of the finished cells, per variant and other grid values."""
    done = cells[cells["status"] == "done"]
    groups = ["variant"] + [_short(k) for k in grid_keys if k != SEED_KEY]
    metrics = ["final_accuracy", "best_accuracy", "seconds"]
    if done.empty:
        return pd.DataFrame(columns=groups)
    table = done.groupby(groups, dropna=False, sort=False)[metrics].agg(["mean", "std", "count"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    return table.reset_index()


def run_comparison(folder: Path, cells: list[Cell], run_cell: Callable[[Cell], None],
                   announce: Callable[[Cell, str], None],
                   chosen: Callable[[Cell], bool] = lambda cell: True) -> pd.DataFrame:
    """Run every unfinished cell that is `chosen` via `run_cell`; write `cells.csv` and
    `summary.csv` as it goes, listing every finished cell (so processes that share out a grid's
    cells each leave a table of all that is done). With output.mlflow set, the cells' MLflow runs
    nest under one parent run of the comparison."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    grid_keys = list(cells[0].values) if cells else []
    with comparison_run(folder, cells[0].config) if cells else contextlib.nullcontext():
        for cell in cells:
            if cell.finished:
                announce(cell, "skipped (finished earlier)")
                rows.append(cell_row(cell, "done"))
            elif not chosen(cell):
                continue
            else:
                announce(cell, "running")
                try:
                    run_cell(cell)
                    rows.append(cell_row(cell, "done"))
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # a failed cell is recorded; the grid goes on
                    (cell.run_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
                    (cell.run_dir / "error.txt").write_text(traceback.format_exc())
                    rows.append(cell_row(cell, "failed", f"{type(exc).__name__}: {exc}"))
                    announce(cell, f"failed: {exc}")
            table = pd.DataFrame(rows)
            table.to_csv(folder / "cells.csv", index=False)
            summarize_cells(table, grid_keys).to_csv(folder / "summary.csv", index=False)
    return pd.DataFrame(rows)
