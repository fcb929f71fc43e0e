"""The fedsim strategy base: cohort sampling, packing onto workers, and unpacking replies.

A strategy subclass states only what differs from plain averaging: the config and arrays each
client is told (`client_config`, `broadcast`, `client_arrays`), how the round's updates become
new global arrays (`aggregate`), and extra metrics (`record`). The base implements Flower's
message-API `Strategy` on top, so it runs under Flower's simulation and deployment engines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy
from pydantic import BaseModel, ConfigDict

from fedsim.config import ExperimentConfig
from fedsim.engine.aggregation import add_sums, add_weighted, mean_from_sum
from fedsim.engine.packing import pack_balanced
from fedsim.engine.protocol import (
    Arrays,
    ClientResult,
    ClientTask,
    Task,
    decode_result,
    encode_task,
    from_record,
    to_record,
)
from fedsim.errors import FedsimError
from fedsim.fairness.groups import counts_from_metrics, fairness_metrics
from fedsim.seeding import derive_seed
from fedsim.system import RoundSystem, SystemModel

SAMPLE_STREAM, EVAL_STREAM = 0x5A3B1E, 0xE7A1


class NoParams(BaseModel):
    """Strategy parameters: none. Subclasses declare theirs as a pydantic model."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class RoundResult:
    """A round's replies, unpacked: clients sorted by id, failures, and weighted mean outputs."""

    clients: list[ClientResult] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    means: dict[str, Arrays] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)  # sampled but dropped out or timed out

    @property
    def num_examples(self) -> float:
        return sum(c.metrics.get("num_examples", 0.0) for c in self.clients)

    def weighted_metric(self, name: str, weight: str = "num_examples") -> float:
        """Mean of a client metric weighted by another (NaN when no client reported it)."""
        pairs = [(c.metrics[name], c.metrics.get(weight, 1.0)) for c in self.clients
                 if name in c.metrics and np.isfinite(c.metrics[name])]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")


Reply = tuple[list[int], RecordDict | None, str]  # (client ids, content or None, error text)


class FedsimStrategy(FlowerStrategy):
    """Base of every fedsim strategy: FedAvg's sampling, packing and weighted averaging."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type[BaseModel]] = NoParams
    per_client_updates: ClassVar[bool] = False  # True: replies carry every client's arrays
    outputs: ClassVar[dict[str, str]] = {"model": "examples"}  # output -> weighting

    def __init__(self, config: ExperimentConfig, client_sizes: np.ndarray,
                 param_names: Iterable[str], run_dir: str = "") -> None:
        self.config = config
        self.param_names = list(param_names)  # trainable parameters (not buffers), in order
        self.params = self.Params.model_validate(config.strategy.params)
        self.client_sizes = np.asarray(client_sizes)
        self.run_dir = run_dir
        self.seed = config.experiment.seed
        self.current: Arrays = {}
        self.last_train = RoundResult()
        self.last_evaluate = RoundResult()
        self.system = SystemModel(config.system, self.client_sizes, config.client, self.seed)
        self.last_system = RoundSystem(participants=[])
        self.simulated_clock = 0.0
        self.shared: Arrays = {}  # arrays every training message carries (e.g. GGEUR's shapes)
        self.placement: dict[int, int] | None = None  # deployment: client id -> its node id
        self.available: list[int] | None = None  # deployment: clients whose node is online
        self.data_info: dict[str, Any] = {}  # deployment: what nodes need to build the model
        self._pending: dict[int, list[int]] = {}
        self._sent: list[Message] = []

    # ---- what subclasses customise -------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        """Config every client of the round receives (e.g. local objectives)."""
        return {}

    def broadcast(self, server_round: int) -> Arrays:
        """Arrays sent once per message to every client (e.g. a server control variate)."""
        return {}

    def client_arrays(self, server_round: int, client_id: int) -> Arrays:
        """Arrays for one client only."""
        return {}

    def aggregate(self, server_round: int, current: Arrays, result: RoundResult) -> Arrays:
        """New global arrays; FedAvg: the sample-weighted mean of the client models."""
        return result.means["model"]

    def record(self, server_round: int, result: RoundResult) -> dict[str, float]:
        """Extra per-round metrics of this strategy."""
        return {}

    @property
    def replies_per_client(self) -> bool:
        """Whether workers reply with every client's arrays instead of pre-aggregated sums (the
        loss decomposition needs every client's model)."""
        return self.per_client_updates or self.config.evaluation.decomposition

    # ---- sampling and packing --------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    def cohort_size(self) -> int:
        s = self.config.strategy
        k = round(s.fraction * self.num_clients) if s.fraction else s.clients_per_round
        return max(1, min(int(k or self.num_clients), self.num_clients))

    def _population(self) -> np.ndarray:
        """The clients that can be sampled: all of them, or (deployed) those online."""
        if self.available is None:
            return np.arange(self.num_clients)
        return np.asarray(self.available, dtype=np.int64)

    def sample_cohort(self, server_round: int) -> list[int]:
        """This round's clients: a sample without replacement from its own seeded stream."""
        rng = np.random.default_rng(derive_seed(self.seed, server_round, SAMPLE_STREAM))
        population = self._population()
        size = min(self.cohort_size(), len(population))
        return sorted(int(c) for c in rng.choice(population, size, replace=False))

    def train_cohort(self, server_round: int) -> list[int]:
        """The sampled clients that take part once dropout and the deadline have struck."""
        self.last_system = self.system.round(server_round, self.sample_cohort(server_round))
        return self.last_system.participants

    def evaluation_cohort(self, server_round: int) -> list[int]:
        fraction = self.config.evaluation.client_fraction
        population = self._population()
        k = min(int(round(fraction * self.num_clients)), len(population))
        if k == 0:
            return []
        rng = np.random.default_rng(derive_seed(self.seed, server_round, EVAL_STREAM))
        return sorted(int(c) for c in rng.choice(population, k, replace=False))

    def plan(self, server_round: int, arrays: Arrays, cohort: list[int], num_workers: int,
             train: bool) -> list[Task]:
        """One task per worker (empty workers get none), clients packed by sample count; when
        deployed, one task per client (each node holds one client)."""
        if train:
            self.current = arrays
        common = self.client_config(server_round) if train else {}
        broadcast = {**self.broadcast(server_round), **self.shared} if train else {}
        reduce = None if (self.replies_per_client or not train) else dict(self.outputs)
        tasks = []
        groups = ([[cid] for cid in cohort] if self.placement is not None
                  else pack_balanced(cohort, self.client_sizes, num_workers))
        for group in groups:
            if not group:
                continue
            clients = [ClientTask(cid, self._client_config(common, cid, train),
                                  self.client_arrays(server_round, cid) if train else {})
                       for cid in group]
            tasks.append(Task(server_round, self.config.to_json_dict(), arrays, clients,
                              broadcast, reduce, self.run_dir, self.data_info))
        return tasks

    def _client_config(self, common: dict[str, Any], client_id: int, train: bool) -> dict[str, Any]:
        config = dict(common)
        if train and client_id in self.last_system.reduced_steps:
            config["local_steps"] = self.last_system.reduced_steps[client_id]
        return config

    # ---- unpacking -----------------------------------------------------------------------
    def unpack(self, replies: Iterable[Reply]) -> RoundResult:
        """Merge worker replies into one result, independent of the order they arrived in."""
        result = RoundResult()
        sums: dict[str, Arrays] = {}
        weights: dict[str, float] = {}
        ordered = sorted(replies, key=lambda r: min(r[0]) if r[0] else -1)
        for client_ids, content, error in ordered:
            if content is None:
                result.failures.update({cid: error for cid in client_ids})
                continue
            worker = decode_result(content)
            result.failures.update(worker.failures)
            result.clients.extend(worker.clients)
            for name, arrays in worker.sums.items():
                sums[name] = add_sums(sums.get(name), arrays)
                weights[name] = weights.get(name, 0.0) + worker.weights[name]
        result.clients.sort(key=lambda c: c.client_id)
        if self.replies_per_client:
            for client in result.clients:
                for name, weighting in self.outputs.items():
                    if name not in client.outputs:  # evaluation replies carry no arrays
                        continue
                    w = client.metrics["num_examples"] if weighting == "examples" else 1.0
                    sums[name] = add_weighted(sums.get(name), client.outputs[name], w)
                    weights[name] = weights.get(name, 0.0) + w
        for name, total in sums.items():
            if weights[name] > 0:
                result.means[name] = mean_from_sum(total, weights[name], self.current)
        return result

    def finish_train(self, server_round: int, replies: Iterable[Reply]) -> tuple[Arrays | None, dict]:
        """Aggregate a round's training replies into new global arrays and round metrics."""
        result = self.unpack(replies)
        result.skipped = dict(self.last_system.skipped)
        self.last_train = result
        self.simulated_clock += self.last_system.simulated_seconds
        skipped = list(result.skipped.values())
        metrics = {"train_loss": result.weighted_metric("train_loss"),
                   "num_clients": float(len(result.clients)),
                   "num_failures": float(len(result.failures)),
                   "num_dropped": float(skipped.count("dropped")),
                   "num_timed_out": float(skipped.count("timed out")),
                   "simulated_seconds": self.last_system.simulated_seconds,
                   "simulated_clock": self.simulated_clock}
        if not result.clients:
            return None, metrics
        new = self.aggregate(server_round, self.current, result)
        metrics.update(self.record(server_round, result))
        return new, metrics

    def finish_evaluate(self, replies: Iterable[Reply]) -> dict[str, float]:
        result = self.unpack(replies)
        self.last_evaluate = result
        metrics = {"client_eval_loss": result.weighted_metric("eval_loss", "num_test_examples"),
                   "client_eval_accuracy": result.weighted_metric("eval_accuracy", "num_test_examples"),
                   "client_eval_failures": float(len(result.failures))}
        counts = {c.client_id: counts_from_metrics(c.metrics) for c in result.clients}
        counts = {cid: c for cid, c in counts.items() if c is not None}
        if counts:  # the clients hold a sensitive attribute: fairness across and within clients
            metrics.update(fairness_metrics(counts))
        return metrics

    # ---- Flower's message-API Strategy ---------------------------------------------------
    def update_availability(self, grid: Grid) -> None:
        """Deployed: note which clients' nodes are online, and stop the run when fewer than
        `strategy.min_available_clients` are."""
        if self.placement is None:
            return
        online = set(grid.get_node_ids())
        self.available = sorted(c for c, node in self.placement.items() if node in online)
        needed = self.config.strategy.min_available_clients
        if len(self.available) < needed:
            raise FedsimError(f"only {len(self.available)} clients' nodes are online, fewer than "
                              f"strategy.min_available_clients = {needed}: stopping the run")

    def _messages(self, tasks: list[Task], grid: Grid, message_type: str,
                  server_round: int) -> list[Message]:
        if self.placement is not None:
            nodes = [self.placement[task.clients[0].client_id] for task in tasks]
        else:
            nodes = sorted(grid.get_node_ids())
        self._pending = {}
        messages = []
        for node, task in zip(nodes, tasks, strict=False):
            self._pending[node] = [c.client_id for c in task.clients]
            messages.append(Message(content=encode_task(task), dst_node_id=node,
                                    message_type=message_type, group_id=str(server_round)))
        self._sent = messages  # the grid gives each its message id when pushing it
        return messages

    def _replies(self, replies: Iterable[Message]) -> list[Reply]:
        """Replies as (client ids, content, error); a message without a reply fails its clients.
        Errors the SuperLink writes itself (e.g. node unavailable) come from the SuperLink, so a
        reply is matched to its node through the message it answers."""
        out, waiting = [], dict(self._pending)
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            ids = waiting.pop(node, [])
            if reply.has_error():
                out.append((ids, None, f"worker error: {reply.error.reason}"))
            else:
                out.append((ids, reply.content, ""))
        for ids in waiting.values():
            out.append((ids, None, "no reply within engine.timeout"))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        current = from_record(arrays)
        self.update_availability(grid)
        num_workers = len(list(grid.get_node_ids()))
        tasks = self.plan(server_round, current, self.train_cohort(server_round),
                          num_workers, train=True)
        return self._messages(tasks, grid, MessageType.TRAIN, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        new, metrics = self.finish_train(server_round, self._replies(replies))
        return (to_record(new) if new is not None else None), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        current = from_record(arrays)
        self.update_availability(grid)
        tasks = self.plan(server_round, current, self.evaluation_cohort(server_round),
                          len(list(grid.get_node_ids())), train=False)
        return self._messages(tasks, grid, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return MetricRecord(self.finish_evaluate(self._replies(replies)))

    def summary(self) -> None:
        """Flower hook; fedsim records its settings in the run directory instead."""
