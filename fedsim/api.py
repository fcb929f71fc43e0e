"""The Python API, for notebooks and scripts: build a config from a dict or a TOML file (with
`key=value` overrides), run it, get the run summary back. Classes and functions can be passed
where a spec takes an import string (strategy, model, dataset, local objectives).

    import fedsim
    spec = fedsim.experiment("experiments/quickstart.toml", "experiment.rounds=5",
                             strategy={"name": MyMethod}, model={"name": my_model})
    summary = fedsim.run(spec)
    summary.rounds  # one row per round (pandas)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsim.config import ExperimentConfig, apply_overrides, read_toml, validate_config
from fedsim.plugins import map_plugins, register


def _as_names(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace classes and functions at the plugin keys by their import strings."""
    return map_plugins(raw, lambda key, value: value if value is None or isinstance(value, str)
                       else register(value))


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


def experiment(source: Mapping[str, Any] | str | Path | None = None, *overrides: str,
           **sections: Any) -> ExperimentConfig:
    """A validated experiment config from a dict or TOML file (or the defaults), then the
    `sections` given as keywords (e.g. `strategy={"name": FedProx, "mu": 0.1}`), then the
    `key=value` overrides. Raises fedsim.errors.ConfigError naming any bad key."""
    if isinstance(source, str | Path):
        raw = read_toml(Path(source))
    else:
        raw = copy.deepcopy(dict(source or {}))
    raw.pop("compare", None)
    raw = _as_names(_merge(raw, sections))
    return validate_config(apply_overrides(raw, list(overrides)))


def run(spec: ExperimentConfig | Mapping[str, Any] | str | Path, *overrides: str,
        progress=None, verbose: bool = False, resume: bool = False, **sections: Any):
    """Run an experiment (a config, or what `experiment` takes) and return its RunSummary: the run
    directory, the per-round table and the seconds it took. `progress(round, row)` is called
    after every round. With `resume`, an unfinished run in output.run_dir continues from its last
    checkpoint."""
    from fedsim.runner import run_experiment

    if not isinstance(spec, ExperimentConfig) or overrides or sections:
        source = spec.to_json_dict() if isinstance(spec, ExperimentConfig) else spec
        spec = experiment(source, *overrides, **sections)
    return run_experiment(spec, progress=progress, verbose=verbose, resume=resume)
