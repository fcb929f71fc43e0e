"""Names to implementations (a composition root): strategies, plus the checks a spec must pass
before anything runs."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydantic import ValidationError

from clients.objectives import OBJECTIVES
from fedsim.config import ExperimentConfig
from fedsim.data.sources import check_dataset_name, check_sensitive
from fedsim.errors import ConfigError
from fedsim.models import check_model_name
from strategies.base import FedsimStrategy
from strategies.fairfed import FairFed
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedld import FedLD
from strategies.fedopt import FedAdam, FedYogi
from strategies.fedprox import FedProx
from strategies.qffl import QFFL
from strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[FedsimStrategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, Scaffold, FedLD, FairFed,
                            QFFL)
}


def strategy_class(name: str) -> type[FedsimStrategy]:
    if name not in STRATEGIES:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"unknown strategy '{name}' in strategy.name; known: {known}")
    return STRATEGIES[name]


def check_config(config: ExperimentConfig) -> None:
    """Checks that need the registries: names of dataset, model and strategy, strategy params."""
    check_dataset_name(config.data.dataset)
    check_sensitive(config.data)
    check_model_name(config.model.name)
    if config.data.embedding == "warmup":
        check_model_name(config.data.warmup.model)
    if config.ggeur.enabled and not config.data.embedding:
        raise ConfigError("ggeur works on embeddings: set data.embedding = 'identity' (flattened "
                          "inputs) or the path of a frozen encoder")
    unknown = sorted(set(config.client.objectives) - set(OBJECTIVES))
    if unknown:
        raise ConfigError(f"unknown local objective(s) {unknown} in client.objectives; "
                          f"known: {', '.join(sorted(OBJECTIVES))}")
    cls = strategy_class(config.strategy.name)
    try:
        cls.Params.model_validate(config.strategy.params)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = "strategy." + ".".join(str(p) for p in error["loc"])
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(cls.Params.model_fields)) or "none"
                problems.append(f"unknown key '{key}' for strategy '{cls.name}' (its parameters: {allowed})")
            else:
                problems.append(f"{key} = {error.get('input')!r}: {error['msg']}")
        raise ConfigError("invalid experiment config: " + "; ".join(problems)) from None


def build_strategy(config: ExperimentConfig, client_sizes: np.ndarray, param_names: Iterable[str],
                   run_dir: str) -> FedsimStrategy:
    return strategy_class(config.strategy.name)(config, client_sizes, param_names, run_dir)
