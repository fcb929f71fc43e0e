"""Continuing a run from its last checkpoint: the experiment it ran, and refusing to continue it
with a different one (naming every key that differs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedsim.config import ExperimentConfig, flat_keys, validate_config
from fedsim.engine.checkpoint import Checkpoint, latest_checkpoint, remove_checkpoints
from fedsim.errors import ConfigError
from fedsim.results import SUMMARY_FILE

# Keys that say where and how often results are written, not what the run computes.
FREE_KEYS = {"output.dir", "output.run_dir", "output.checkpoint_every", "output.checkpoint_keep",
             "output.mlflow", "output.tensorboard"}
ABSENT = "(not set)"


def differences(ran: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two resolved experiments, as 'key: ran -> now'."""
    before, after = flat_keys(ran), flat_keys(now)
    return [f"{key}: {before.get(key, ABSENT)!r} -> {after.get(key, ABSENT)!r}"
            for key in sorted(before.keys() | after.keys())
            if key not in FREE_KEYS and before.get(key, ABSENT) != after.get(key, ABSENT)]


def saved_config(run_dir: Path) -> ExperimentConfig:
    """The experiment a run directory ran (its config.json), set to continue in that directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it has no config.json): give the "
                          "directory a `fedsim run` wrote")
    raw = json.loads(path.read_text())
    raw["output"]["run_dir"] = str(run_dir)
    return validate_config(raw)


def resumable_checkpoint(config: ExperimentConfig) -> Checkpoint | None:
    """The checkpoint `config`'s run directory can continue from, or None (nothing saved yet:
    the run starts again from round 0, and says so). A finished run, or a checkpoint of a
    different experiment, is refused."""
    run_dir = config.output.run_dir
    if run_dir is None:
        raise ConfigError("continuing a run needs its directory: set output.run_dir")
    if (run_dir / SUMMARY_FILE).is_file():
        remove_checkpoints(run_dir)  # left behind by a kill after the run finished
        raise ConfigError(f"{run_dir} is a finished run: there is nothing to resume")
    checkpoint = latest_checkpoint(run_dir)
    saved = run_dir / "config.json"
    if checkpoint is not None:
        ran = checkpoint.engine["experiment"]
    elif saved.is_file():
        ran = json.loads(saved.read_text())
        print(f"note: {run_dir} has no checkpoint yet: starting it again from round 0", file=sys.stderr)
    else:
        return None
    changed = differences(ran, config.to_json_dict())
    if changed:
        raise ConfigError(f"the experiment differs from the one {run_dir} ran, so it cannot continue "
                          f"that run: {'; '.join(changed)}. Restore those settings, continue with the "
                          f"run's own (`fedsim run --resume {run_dir}` without a spec), or start a new run")
    return checkpoint
