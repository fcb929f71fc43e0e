"""The ServerApp the SuperLink runs: `flwr run . <superlink> --run-config "experiment='x.toml'"`.

Run config keys (declared in pyproject.toml's `[tool.flwr.app.config]`):
- `experiment`: the experiment spec; a relative path is looked up in the SuperLink's working
  directory, then in the app bundle (which carries `experiments/`);
- `overrides`: `key=value` settings as on `fedsim run --set`, separated by spaces (shell quoting).
"""

from __future__ import annotations

import shlex
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ExperimentConfig, load_config, validate_config
from fedsim.deploy.server import run_deployment
from fedsim.errors import ConfigError
from fedsim.plugins import APP_ROOT, app_relative_file_plugins


def experiment_path(name: str) -> Path:
    """The experiment file a run config names (absolute, or relative to the working directory
    or to the app bundle)."""
    for candidate in (Path(name).expanduser(), APP_ROOT / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"run config experiment = '{name}' is not a file here or in the app "
                      f"bundle ({APP_ROOT}); pass --run-config \"experiment='experiments/x.toml'\"")


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    """The experiment a run config names, with its overrides applied; plugin files inside the app
    bundle are named relative to it (`@app/...`), so every node finds its own copy."""
    overrides = shlex.split(str(run_config.get("overrides", "")))
    config = load_config(experiment_path(str(run_config.get("experiment", ""))), overrides)
    return validate_config(app_relative_file_plugins(config.to_json_dict()))


def log_round(server_round: int, row: dict) -> None:
    """One line per round in the SuperLink's log stream (`flwr run --stream`)."""
    shown = {k: row[k] for k in ("test_accuracy", "test_loss", "train_loss", "num_clients",
                                 "num_failures") if k in row}
    log(INFO, "fedsim round %d: %s", server_round,
        "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the named experiment with the connected SuperNodes as its clients."""
    config = config_from_run_config(dict(context.run_config))
    summary = run_deployment(config, grid, progress=log_round)
    log(INFO, "fedsim run directory: %s", summary.run_dir.resolve())
