"""Flower's own message-API strategies (`strategy.name = "flwr:FedMedian"`) on fedsim's engine.

fedsim samples the cohort, packs it onto workers and trains each virtual client as plain local
training; this method then hands the Flower strategy one reply per virtual client (its model as
an ArrayRecord, its example count as `num-examples`) and takes its result as the new global
model. The strategy's constructor arguments are the `[strategy]` keys; a DP wrapper names the
strategy it wraps with `strategy.wrap` (default FedAvg) and gets `num_sampled_clients` from the
cohort size unless given. The Flower strategy's own client sampling sees exactly the cohort
fedsim sampled (its fraction_train is 1), so sampling stays seeded and reproducible.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower_strategies
from pydantic import BaseModel, ConfigDict

from fedsim.engine.inprocess import server_task_identity
from fedsim.engine.protocol import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.method import Arrays, Method, RoundResult

PREFIX = "flwr:"
WRAP_KEY = "wrap"
# Flower's sampling knobs: fedsim samples, the Flower strategy takes every client it is handed.
SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
            "min_evaluate_nodes": 0, "min_available_nodes": 1}


def flower_names() -> list[str]:
    """The message-API strategies Flower ships that aggregate models (not XGBoost trees)."""
    return sorted(n for n in flower_strategies.__all__
                  if n not in ("Strategy", "Result") and not n.startswith("FedXgb"))


def flower_class(name: str) -> type:
    if name not in flower_names():
        raise ConfigError(f"strategy.name = '{PREFIX}{name}': Flower has no such strategy; "
                          f"known: {', '.join(PREFIX + n for n in flower_names())}")
    return getattr(flower_strategies, name)


def _construct(cls: type, arguments: dict[str, Any]) -> Any:
    """`cls(**arguments)` with fedsim's sampling knobs where `cls` takes them."""
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown key(s) {['strategy.' + k for k in unknown]} for "
                          f"{PREFIX}{cls.__name__}; its arguments: {', '.join(accepted)}")
    for key in set(SAMPLING) & set(arguments):
        raise ConfigError(f"strategy.{key} is fedsim's to set for {PREFIX}{cls.__name__}: "
                          "choose the cohort with strategy.clients_per_round or strategy.fraction")
    knobs = {k: v for k, v in SAMPLING.items() if k in accepted}
    try:
        return cls(**knobs, **arguments)
    except Exception as exc:
        raise ConfigError(f"{PREFIX}{cls.__name__}({arguments}): {type(exc).__name__}: {exc}") from None


def build_flower_strategy(name: str, params: dict[str, Any], cohort_size: int) -> Any:
    """The Flower strategy `name` built from the `[strategy]` keys (a DP wrapper around its
    `wrap` strategy)."""
    cls = flower_class(name)
    arguments = dict(params)
    if "strategy" in inspect.signature(cls).parameters:  # a wrapper
        inner = flower_class(str(arguments.pop(WRAP_KEY, "FedAvg")))
        arguments["strategy"] = _construct(inner, {})
        arguments.setdefault("num_sampled_clients", cohort_size)
    elif WRAP_KEY in arguments:
        raise ConfigError(f"strategy.{WRAP_KEY} is only for Flower's DP wrappers, not {PREFIX}{name}")
    return _construct(cls, arguments)


class VirtualClients:
    """The part of a Flower Grid a strategy's configure_train asks: the clients it may sample."""

    def __init__(self, client_ids: list[int]) -> None:
        self.client_ids = client_ids

    def get_node_ids(self) -> list[int]:
        return list(self.client_ids)


class FlowerParams(BaseModel):
    """A Flower strategy's constructor arguments (checked against its signature)."""

    model_config = ConfigDict(extra="allow")


class FlowerStrategy(Method):
    """A Flower message-API strategy aggregating fedsim's per-client replies."""

    Params = FlowerParams
    flower_name: ClassVar[str] = "FedAvg"
    per_client_updates = True

    @classmethod
    def wrapping(cls, name: str) -> type[FlowerStrategy]:
        flower_class(name)
        return type(f"Flower{name}", (cls,), {"name": PREFIX + name, "flower_name": name})

    @classmethod
    def check(cls, params: dict[str, Any]) -> None:
        build_flower_strategy(cls.flower_name, params, cohort_size=1)

    def __init__(self, params=None, run=None, cohort_size: int = 1) -> None:
        super().__init__(params, run)
        self.flower = None
        if run is not None:  # the server half
            extra = dict(self.params.model_extra or {})
            self.flower = build_flower_strategy(self.flower_name, extra, cohort_size)

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        cohort = [c.client_id for c in result.clients]
        with server_task_identity():
            sent = list(self.flower.configure_train(server_round, to_record(current), ConfigRecord(),
                                                    VirtualClients(cohort)))
            for number, message in enumerate(sent):  # what a grid does when it pushes them
                message.metadata.__dict__["_message_id"] = f"virtual-{server_round}-{number}"
            by_client = {m.metadata.dst_node_id: m for m in sent}
            replies = [Message(RecordDict({
                "arrays": to_record(client.outputs["model"]),
                "metrics": MetricRecord({"num-examples": float(client.metrics["num_examples"])}),
            }), reply_to=by_client[client.client_id]) for client in result.clients]
            record, metrics = self.flower.aggregate_train(server_round, replies)
        if record is None:
            raise ValueError(f"{self.name} returned no model for round {server_round}")
        new = from_record(record)
        new = {k: new[k].astype(current[k].dtype) for k in current}
        return new, {f"flwr_{k}": float(v) for k, v in dict(metrics or {}).items()
                     if isinstance(v, int | float)}
