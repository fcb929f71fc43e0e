"""The run directory: resolved config, per-round and per-client tables, final model, log.

While a run goes on, every finished round is appended to `rounds.jsonl` and `clients.jsonl`
(one JSON object per line: constant work per round, and a crash at any point keeps every round
written before it). When the run stops, the tables are written once as `rounds.parquet` and
`clients.parquet`; a finished run then drops its journals. `read_table` reads either.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.config import ExperimentConfig
from fedsim.errors import FedsimError
from fedsim.tracking import open_trackers

SUMMARY_FILE = "summary.json"  # written last: its presence marks a finished run


def default_run_dir(config: ExperimentConfig) -> Path:
    """`output.run_dir` if set, else `output.dir/<name>-<timestamp>-s<seed>`, made unique and
    created here (so two runs started in the same second never share a directory)."""
    if config.output.run_dir is not None:
        return config.output.run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = config.output.dir / f"{config.experiment.name}-{stamp}-s{config.experiment.seed}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def with_run_dir(config: ExperimentConfig) -> ExperimentConfig:
    """`config` with its run directory decided (output.run_dir set to `default_run_dir`)."""
    output = config.output.model_copy(update={"run_dir": default_run_dir(config)})
    return config.model_copy(update={"output": output})


TABLES = {"rounds": ["round"], "clients": ["round", "client_id"]}  # each table's row key


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot record {type(value).__name__} {value!r} in a results table")


def _journal_entries(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each complete line of a journal with its row; a last line cut off by a crash is left out."""
    with open(path) as handle:
        for line in handle:
            try:
                yield line.rstrip("\n"), json.loads(line)
            except json.JSONDecodeError:
                return  # only the line being written when the process died can be incomplete


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The rows of a journal."""
    return [row for _, row in _journal_entries(path)]


def journal_lines(path: Path, last_round: int) -> list[str]:
    """A journal's complete lines of rounds up to `last_round`, exactly as written."""
    if not path.is_file():
        return []
    return [line + "\n" for line, row in _journal_entries(path) if row["round"] <= last_round]


def read_table(run_dir: Path, name: str) -> pd.DataFrame:
    """A run's `rounds` or `clients` table, whether it finished, stopped or was killed (empty when
    it has none). Journal lines with the same key are one row (a later line completes an earlier
    one: evaluation.with_training reports a round's client evaluation with the next round)."""
    journal, table = Path(run_dir) / f"{name}.jsonl", Path(run_dir) / f"{name}.parquet"
    if journal.is_file():
        frame = pd.DataFrame(read_journal(journal))
        if frame.empty or not frame.duplicated(TABLES[name]).any():
            return frame
        return frame.groupby(TABLES[name]).first().reset_index()
    return pd.read_parquet(table) if table.is_file() else pd.DataFrame()


def replace_atomically(path: Path, write) -> None:
    """Write `path` through `write(tmp)` and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write(tmp)
    os.replace(tmp, path)


def write_summary(run_dir: Path, rounds: pd.DataFrame, seconds: float) -> None:
    """`summary.json`, whose presence marks a finished run: rounds, seconds, the final and best
    test accuracy (the clients' local accuracy when the server has no test set)."""
    column = "test_accuracy" if "test_accuracy" in rounds else "client_eval_accuracy"
    accuracy = rounds[column].dropna() if column in rounds else pd.Series(dtype=float)
    summary = {"rounds": int(rounds["round"].max()), "seconds": seconds,
               "final_accuracy": float(accuracy.iloc[-1]) if len(accuracy) else float("nan"),
               "best_accuracy": float(accuracy.max()) if len(accuracy) else float("nan")}
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


class RunWriter:
    """Writes one run's results as they come in, and tells the trackers `[output]` enables."""

    def __init__(self, run_dir: Path, config: ExperimentConfig, resume_after: int | None = None) -> None:
        """A new run (its journals start empty), or with `resume_after` = r a run continued from
        its checkpoint of round r (rows of later rounds are dropped: they will be run again)."""
        self.run_dir = Path(run_dir)
        self.trackers = open_trackers(config, self.run_dir, self.log)  # before anything is written
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_after is None:
                text = json.dumps(config.to_json_dict(), indent=2)
                replace_atomically(self.run_dir / "config.json", lambda tmp: tmp.write_text(text))
            for name in TABLES:
                kept = [] if resume_after is None else journal_lines(self._journal(name), resume_after)
                replace_atomically(self._journal(name),
                                    lambda tmp, lines=kept: tmp.write_text("".join(lines)))
        except OSError as exc:
            raise FedsimError(f"cannot write the run directory {self.run_dir}: {exc.strerror or exc}; "
                              "choose a writable place with --set output.dir=... (or output.run_dir)"
                              ) from None
        self.trackers.start(config, resume_after)

    def _journal(self, name: str) -> Path:
        return self.run_dir / f"{name}.jsonl"

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        """Append one finished round (its row and its clients' rows) to the journals."""
        try:
            for name, rows in (("clients", client_rows), ("rounds", [row])):
                with open(self._journal(name), "a") as handle:
                    handle.writelines(json.dumps(r, default=_json_value) + "\n" for r in rows)
        except OSError as exc:
            raise FedsimError(f"cannot record round {row['round']} in {self.run_dir}: "
                              f"{exc.strerror or exc}; the rounds before it are kept") from None
        self.trackers.add_round(row, client_rows)

    def write_tables(self, finished: bool) -> None:
        """The journals as parquet tables (atomically); a finished run drops its journals."""
        for name in TABLES:
            table = read_table(self.run_dir, name)
            replace_atomically(self.run_dir / f"{name}.parquet",
                                lambda tmp, t=table: t.to_parquet(tmp, index=False))
            if finished:
                self._journal(name).unlink()

    def stop(self, interrupted: bool) -> None:
        """A run that stopped before its end (failed, or interrupted): its tables as far as it
        got, and its trackers told."""
        with contextlib.suppress(OSError):  # e.g. a full disk: the journals hold every round
            self.write_tables(finished=False)
        self.trackers.stop("interrupted" if interrupted else "failed")

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

    def finish(self, seconds: float) -> pd.DataFrame:
        """Mark the run complete: its tables, then `summary.json`; returns the rounds table."""
        self.write_tables(finished=True)
        rounds = read_table(self.run_dir, "rounds")
        write_summary(self.run_dir, rounds, seconds)
        self.log(f"done in {seconds:.1f} s")
        self.trackers.stop("finished")
        return rounds

    def log(self, line: str) -> None:
        with open(self.run_dir / "log.txt", "a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")
