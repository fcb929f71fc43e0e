"""Names to implementations (the composition root): methods, add-ons, loss terms, models and
datasets by built-in name or import string, and the checks a spec must pass before anything
runs (each names the key and the plugin at fault)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedsim.config import ExperimentConfig
from fedsim.data.sources import check_dataset_name, check_sensitive, has_sensitive_attribute
from fedsim.engine.cohort import cohort_size
from fedsim.errors import ConfigError
from fedsim.method import AddOn, ClientContext, LossTerm, Method, RunInfo, overrides
from fedsim.models import check_model
from fedsim.plugins import is_plugin, is_process_local, load_object, map_plugins
from fedsim.privacy.dp_fedavg import ClientLevelDP
from fedsim.privacy.dp_sgd import ExampleLevelDP
from fedsim.terms import BalancedSoftmax, ParityConstraint, ParityPenalty, Proximal
from strategies.ditto import Ditto
from strategies.fairfed import FairFed
from strategies.fal import Fal
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedbabu import FedBABU
from strategies.fedbn import FedBN
from strategies.fedlabel import FedLabel
from strategies.fedld import FedLD, MarginControl
from strategies.fedloge import FedLoGe
from strategies.fednova import FedNova
from strategies.fedopt import FedAdam, FedYogi
from strategies.fedper import FedPer
from strategies.fedprox import FedProx
from strategies.fedrep import FedRep
from strategies.flower import PREFIX as FLOWER_PREFIX
from strategies.flower import FlowerStrategy, flower_names
from strategies.ggeur import Ggeur
from strategies.moon import Moon
from strategies.qffl import QFFL
from strategies.scaffold import Scaffold

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, Scaffold, FedLD, FairFed,
                            QFFL, FedNova, Moon, FedPer, FedRep, FedBABU, Ditto, FedBN,
                            FedLoGe)
}
LOSS_TERMS: dict[str, type[LossTerm]] = {cls.name: cls for cls in (
    BalancedSoftmax, MarginControl, ParityConstraint, ParityPenalty, Proximal)}
# each switched on by `[<name>] enabled`; they run in this order (privacy last: it clips what is sent)
ADD_ONS: dict[str, type[AddOn]] = {Ggeur.name: Ggeur, Fal.name: Fal, FedLabel.name: FedLabel,
                                   ExampleLevelDP.name: ExampleLevelDP, ClientLevelDP.name: ClientLevelDP}


def strategy_names() -> list[str]:
    """Every name `strategy.name` accepts besides import strings."""
    return [*sorted(METHODS), *(FLOWER_PREFIX + n for n in flower_names())]


def _plugin_class(name: str, key: str, base: type) -> type:
    obj = load_object(name, key)
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise ConfigError(f"{key} = '{name}' is not a subclass of fedsim.method.{base.__name__}")
    return obj


def method_class(name: str) -> type[Method]:
    """The method `strategy.name` names: built-in, `flwr:<Strategy>`, or an import string."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith(FLOWER_PREFIX):
        return FlowerStrategy.wrapping(name[len(FLOWER_PREFIX):])
    if is_plugin(name):
        return _plugin_class(name, "strategy.name", Method)
    raise ConfigError(f"unknown strategy '{name}' in strategy.name; known: {', '.join(strategy_names())}, "
                      "or 'package.module:Name' / 'file.py:Name' for your own")


def term_class(name: str) -> type[LossTerm]:
    if name in LOSS_TERMS:
        return LOSS_TERMS[name]
    if is_plugin(name):
        return _plugin_class(name, f"client.objectives.{name}", LossTerm)
    raise ConfigError(f"unknown local objective '{name}' in client.objectives; known: "
                      f"{', '.join(sorted(LOSS_TERMS))}, or 'package.module:Name' for your own")


def build_method(config: ExperimentConfig, run: RunInfo | None = None) -> Method:
    """The run's method: its client half on a worker (`run` None), both halves on the server."""
    cls = method_class(config.strategy.name)
    if issubclass(cls, FlowerStrategy) and run is not None:
        return cls(config.strategy.params, run, cohort_size(config, run.num_clients))
    return cls(config.strategy.params, run)


def build_add_ons(config: ExperimentConfig, run: RunInfo | None = None) -> list[AddOn]:
    """The add-ons the spec switches on, in registry order."""
    sections = {name: getattr(config, name) for name in ADD_ONS}
    return [ADD_ONS[name](section, run) for name, section in sections.items() if section.enabled]


def build_terms(config: ExperimentConfig,
                context_for: Callable[[str], ClientContext]) -> list[LossTerm]:
    """The loss terms `client.objectives` adds for every method, each with the client context
    `context_for(name)` gives it."""
    return [term_class(name)(term_class(name).Params.model_validate(params), context_for(name))
            for name, params in config.client.objectives.items()]


def _check_params(model: type[BaseModel], params: dict[str, Any], key: str, owner: str) -> None:
    try:
        model.model_validate(params)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = f"{key}." + ".".join(str(p) for p in error["loc"])
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(model.model_fields)) or "none"
                problems.append(f"unknown key '{where}' for {owner} (its parameters: {allowed})")
            else:
                problems.append(f"{where} = {error.get('input')!r}: {error['msg']}")
        raise ConfigError("invalid experiment config: " + "; ".join(problems)) from None


def plugin_names(config: ExperimentConfig) -> dict[str, str]:
    """The import strings of a spec, by the key that names them."""
    names: dict[str, str] = {}
    map_plugins(config.to_json_dict(), lambda key, name: names.setdefault(key, name))
    return {key: name for key, name in names.items() if is_plugin(name)}


def check_reachable(config: ExperimentConfig) -> None:
    """Objects passed from Python that no other process can import need the in-process backend."""
    if config.engine.backend == "inprocess":
        return
    for key, name in plugin_names(config).items():
        if is_process_local(name):
            raise ConfigError(f"{key} was passed from Python as an object defined in __main__ or "
                              "inside a function, which Ray workers cannot import: define it in a "
                              "module (or a .py file named as 'file.py:Name'), or set "
                              "engine.backend = 'inprocess'")


def check_config(config: ExperimentConfig) -> None:
    """Every check that needs the registries, before anything runs: dataset, model, strategy and
    its parameters, local objectives and their parameters, add-ons, sensitive attributes."""
    check_reachable(config)
    check_dataset_name(config.data.dataset)
    check_sensitive(config.data)
    check_model(config.model)
    check_encoder_file(config)
    if config.data.embedding == "warmup":
        check_model(config.model.model_copy(update={"name": config.data.warmup.model}))
    if config.ggeur.enabled and not config.data.embedding:
        raise ConfigError("ggeur works on embeddings: set data.embedding = 'identity' (flattened "
                          "inputs) or the path of a frozen encoder")
    cls = method_class(config.strategy.name)
    if not issubclass(cls, FlowerStrategy):  # a Flower strategy's arguments: checked by its check
        _check_params(cls.Params, config.strategy.params, "strategy", f"strategy '{cls.label()}'")
    cls.check(config)
    if config.evaluation.decomposition and overrides(cls, Method, "personal_model"):
        raise ConfigError(f"evaluation.decomposition with strategy '{cls.label()}': the "
                          "decomposition evaluates every client's whole model, and a personal "
                          "method's clients keep part of theirs; set it to false")
    for name, add_on in ADD_ONS.items():
        if getattr(config, name).enabled:
            add_on.check(config)
            add_on.check_method(cls)
    for name, params in config.client.objectives.items():
        _check_params(term_class(name).Params, params, f"client.objectives.{name}",
                      f"local objective '{name}'")
    check_groups(config, has_sensitive_attribute(config.data))


def check_encoder_file(config: ExperimentConfig) -> None:
    """The frozen encoder (`data.embedding`) a run encodes its data with exists, so a comparison
    stops before its first cell rather than failing every cell (`check_model` does the same for
    `model.init`)."""
    embedding = config.data.embedding
    if embedding not in ("", "identity", "warmup") and not Path(embedding).is_file():
        raise ConfigError(f"data.embedding = {embedding}: no such file (a frozen encoder, e.g. "
                          "the -encoder.pt `fedsim pretrain` writes, or 'identity' or 'warmup')")


def check_groups(config: ExperimentConfig, has_groups: bool) -> None:
    """Refuse a strategy or local objective that reads sensitive groups when the data have none
    (known from the dataset's name, or from a user's dataset once it has loaded)."""
    method = method_class(config.strategy.name)
    needs = [f"strategy '{method.label()}'"] if method.needs_groups else []
    needs += [f"local objective '{name}'" for name in config.client.objectives
              if term_class(name).needs_groups]
    if needs and not has_groups:
        raise ConfigError(f"{' and '.join(needs)} need(s) a dataset with a sensitive attribute "
                          f"(adult, german, or your own with sensitive_train); data.dataset = "
                          f"'{config.data.dataset}' has none")
