"""Flower's own message-API strategies (`strategy.name = "flwr:FedMedian"`) on fedsim's engine.

fedsim samples the cohort, packs it onto workers and trains each virtual client as plain local
training; this method then hands the Flower strategy one reply per virtual client (its trainable
parameters as an ArrayRecord, its example count as `num-examples`) and takes its result as the
new global parameters; buffers (BatchNorm statistics) take the FedAvg mean. The strategy's
constructor arguments are the `[strategy]` keys. Only strategies that work on the server alone
are offered: the client-side DP wrappers, FedProx and QFedAvg need clients that cooperate.

A server-side DP wrapper names the strategy it wraps with `strategy.wrap` (default FedAvg); it
gets equal client weights (the sensitivity clip / m its noise is calibrated to assumes them),
`num_sampled_clients` = the clients that replied this round (dropouts and failures shrink the
average, so the noise follows), and noise drawn from a generator seeded per round, so runs are
reproducible. The Flower strategy's own client sampling sees exactly the cohort fedsim sampled
(its fraction_train is 1), so sampling stays seeded and reproducible too.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower_strategies
from pydantic import BaseModel, ConfigDict

from fedsim.engine.inprocess import server_task_identity
from fedsim.engine.protocol import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.method import Arrays, Method, RoundResult
from fedsim.seeding import derive_seed

PREFIX = "flwr:"
WRAP_KEY = "wrap"
# Flower's sampling knobs: fedsim samples, the Flower strategy takes every client it is handed.
SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
            "min_evaluate_nodes": 0, "min_available_nodes": 1}


NEEDS_CLIENTS = ("FedProx", "QFedAvg")  # clients must apply a proximal term / report their loss
DP_NOISE_STREAM = 0xD9


def flower_names() -> list[str]:
    """The message-API strategies Flower ships that aggregate models on the server alone."""
    return sorted(n for n in flower_strategies.__all__
                  if n not in ("Strategy", "Result", *NEEDS_CLIENTS) and not n.startswith("FedXgb")
                  and "ClientSide" not in n)


def is_wrapper(cls: type) -> bool:
    """A DP wrapper: it wraps another strategy."""
    return "strategy" in inspect.signature(cls).parameters


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
    if is_wrapper(cls):
        inner = flower_class(str(arguments.pop(WRAP_KEY, "FedAvg")))
        arguments["strategy"] = _construct(inner, {})
        if "num_sampled_clients" in arguments:
            raise ConfigError(f"strategy.num_sampled_clients is fedsim's to set for {PREFIX}{name}: "
                              "each round it is the number of clients that replied")
        arguments["num_sampled_clients"] = cohort_size
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
    def check(cls, config) -> None:
        build_flower_strategy(cls.flower_name, config.strategy.params, cohort_size=1)

    def __init__(self, params=None, run=None, cohort_size: int = 1) -> None:
        super().__init__(params, run)
        self.flower = None
        if run is not None:  # the server half
            extra = dict(self.params.model_extra or {})
            self.flower = build_flower_strategy(self.flower_name, extra, cohort_size)

    def save_state(self) -> Arrays:
        """The Flower strategy keeps its state in its own attributes (FedAdam's moments, an
        adaptive clip): a checkpoint holds the whole object, pickled."""
        return {"flower": np.frombuffer(pickle.dumps(self.flower), dtype=np.uint8)}

    def load_state(self, state: Arrays) -> None:
        if "flower" in state:
            self.flower = pickle.loads(state["flower"].tobytes())  # noqa: S301 - the run's own file

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        names = self.run.param_names
        private = is_wrapper(type(self.flower))
        parameters = {n: current[n] for n in names}
        with server_task_identity():
            sent = list(self.flower.configure_train(server_round, to_record(parameters), ConfigRecord(),
                                                    VirtualClients([c.client_id for c in result.clients])))
            for number, message in enumerate(sent):  # what a grid does when it pushes them
                message.metadata.__dict__["_message_id"] = f"virtual-{server_round}-{number}"
            by_client = {m.metadata.dst_node_id: m for m in sent}
            replies = [Message(RecordDict({
                "arrays": to_record({n: client.outputs["model"][n] for n in names}),
                "metrics": MetricRecord({"num-examples": 1.0 if private else
                                         float(client.metrics["num_examples"])}),
            }), reply_to=by_client[client.client_id]) for client in result.clients]
            if private:
                self.flower.num_sampled_clients = len(replies)
            with seeded_numpy(derive_seed(self.run.seed, server_round, DP_NOISE_STREAM)):
                record, metrics = self.flower.aggregate_train(server_round, replies)
        if record is None:
            raise ValueError(f"{self.name} returned no model for round {server_round}")
        aggregated = from_record(record)
        new = dict(result.means["model"])  # buffers: the FedAvg mean
        new.update({n: aggregated[n].astype(current[n].dtype) for n in names})
        return new, {f"flwr_{k}": float(v) for k, v in dict(metrics or {}).items()
                     if isinstance(v, int | float)}


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """numpy's global generator (which Flower's DP noise draws from) seeded, then restored."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)
