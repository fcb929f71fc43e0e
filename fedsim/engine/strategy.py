"""The one Flower message-API `Strategy` fedsim runs, under every backend (Ray, in-process,
deployed SuperNodes): it samples a cohort of virtual clients, packs it into one message per
worker node, unpacks the replies into a `RoundResult` sorted by client id, and hands that to the
run's method. Per-client state (simulation) is kept here and travels with each client's task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.config import ExperimentConfig
from fedsim.engine.aggregation import add_sums, add_weighted, mean_from_sum
from fedsim.engine.cohort import CohortSampler
from fedsim.engine.packing import pack_balanced
from fedsim.engine.protocol import (
    RECEIVED,
    ClientTask,
    Task,
    decode_result,
    encode_task,
    from_record,
    to_record,
)
from fedsim.errors import FedsimError
from fedsim.evaluation import spread
from fedsim.fairness.groups import counts_from_metrics, fairness_metrics
from fedsim.method import AddOn, Arrays, ClientResult, Method, RoundResult, Weighting
from fedsim.personal import personal_round_metrics
from fedsim.system import RoundSystem

SETUP_ACTION = "fedsim_setup"  # messages of type query.fedsim_setup: the setup phase
Reply = tuple[list[int], RecordDict | None, str]  # (client ids, content or None, error text)
Listener = Callable[[str, int, RoundResult], None]  # (kind: train / evaluate, round, result)


class FedsimStrategy(Strategy):
    """Sampling, packing and unpacking around one method and its add-ons."""

    def __init__(self, config: ExperimentConfig, method: Method, add_ons: list[AddOn],
                 client_sizes, listener: Listener | None = None,
                 placement: dict[int, int] | None = None,
                 data_info: dict[str, Any] | None = None,
                 class_groups: np.ndarray | None = None) -> None:
        """`placement` (deployed): client id -> the node that holds it; `data_info`: what nodes
        need to build the model; `class_groups`: each class's long-tail group, for personal
        accuracy on the many / medium / few classes."""
        self.config, self.method, self.add_ons = config, method, add_ons
        self.sampler = CohortSampler(config, client_sizes)
        self.listener = listener
        self.placement = placement
        self.data_info = data_info or {}
        self.class_groups = class_groups
        self.client_state: dict[int, dict[str, Arrays]] = {}  # simulation: state kept per client
        self.simulated_clock = 0.0
        self._system = RoundSystem(participants=[])
        self._current: Arrays = {}
        self._pending: dict[int, list[int]] = {}
        self._sent: list[Message] = []

    @property
    def components(self) -> list[Method | AddOn]:
        """The method and its add-ons."""
        return [self.method, *self.add_ons]

    @property
    def weightings(self) -> dict[str, Weighting]:
        """How each client output is weighted in its mean: the method's, or an add-on's where it
        says otherwise."""
        out = dict(self.method.outputs)
        for add_on in self.add_ons:
            out.update({k: v for k, v in add_on.output_weighting.items() if k in out})
        return out

    @property
    def replies_per_client(self) -> bool:
        """Whether workers reply with every client's arrays instead of pre-aggregated sums (the
        loss decomposition needs every client's model)."""
        return self.method.per_client_updates or self.config.evaluation.decomposition

    # ---- packing --------------------------------------------------------------------------
    def tasks(self, server_round: int, arrays: Arrays, cohort: list[int], num_workers: int,
              train: bool) -> list[Task]:
        """One task per worker (empty workers get none), clients packed by sample count; when
        deployed, one task per client (each node holds one client)."""
        broadcast = {}
        if train:
            senders = self.components
        elif self.method.personalizes and server_round > 0:
            senders = [self.method]  # personal models may be built from it (FedLoGe's)
        else:
            senders = []
        for component in senders:
            if shared := component.broadcast(server_round, arrays):
                broadcast[component.label()] = shared
        reduce = None if (self.replies_per_client or not train) else self.weightings
        groups = ([[cid] for cid in cohort] if self.placement is not None
                  else pack_balanced(cohort, self.sampler.client_sizes, num_workers))
        experiment = self.config.to_json_dict()
        experiment.pop("output")  # where the server writes results is no business of the workers
        evaluate_first = train and self.evaluates_received(server_round)
        ships_state = train or self.method.personalizes  # personal models are evaluated from it
        tasks = []
        for group in groups:
            if not group:
                continue
            clients = [ClientTask(cid, self._plan(server_round, cid) if train else {},
                                  self.client_state.get(cid, {}) if ships_state else {})
                       for cid in group]
            tasks.append(Task(server_round, experiment, arrays, clients, broadcast, reduce,
                              self.data_info, evaluate_first))
        return tasks

    def evaluates_received(self, server_round: int) -> bool:
        """Whether round `server_round`'s training clients first evaluate the model they receive
        (evaluation.with_training, when round server_round - 1's client evaluation is due)."""
        ev = self.config.evaluation
        return ev.with_training and ev.client_fraction > 0 and (server_round - 1) % ev.client_every == 0

    def _plan(self, server_round: int, client_id: int) -> dict[str, Any]:
        steps = self._system.reduced_steps.get(client_id)
        return self.method.plan(server_round, client_id, steps).model_dump(mode="json", exclude_none=True)

    def messages(self, tasks: list[Task], grid: Grid, message_type: str,
                 server_round: int) -> list[Message]:
        """One Flower message per task, to its worker node (deployed: its client's node)."""
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

    # ---- unpacking -----------------------------------------------------------------------
    def replies(self, replies: Iterable[Message]) -> list[Reply]:
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

    @staticmethod
    def split_received(result: RoundResult) -> RoundResult:
        """Take the clients' evaluations of the model they received out of a training result."""
        received = RoundResult()
        for client in result.clients:
            keys = [k for k in client.metrics if k.startswith(RECEIVED)]
            if keys:
                received.clients.append(ClientResult(
                    client.client_id, {k.removeprefix(RECEIVED): client.metrics.pop(k) for k in keys}))
        return received

    def unpack(self, replies: Iterable[Reply]) -> RoundResult:
        """Merge worker replies into one result, independent of the order they arrived in."""
        result = RoundResult()
        sums: dict[str, Arrays] = {}
        weights: dict[str, float] = {}
        for client_ids, content, error in sorted(replies, key=lambda r: min(r[0]) if r[0] else -1):
            if content is None:
                result.failures.update({cid: error for cid in client_ids})
                continue
            worker = decode_result(content)
            result.notes.extend(n for n in worker.notes if n not in result.notes)
            result.failures.update(worker.failures)
            result.clients.extend(worker.clients)
            for name, arrays in worker.sums.items():
                sums[name] = add_sums(sums.get(name), arrays)
                weights[name] = weights.get(name, 0.0) + worker.weights[name]
        result.clients.sort(key=lambda c: c.client_id)
        if self.replies_per_client:
            for client in result.clients:
                for name, weighting in self.weightings.items():
                    if name not in client.outputs:  # evaluation replies carry no arrays
                        continue
                    w = client.metrics["num_examples"] if weighting == "examples" else 1.0
                    sums[name] = add_weighted(sums.get(name), client.outputs[name], w)
                    weights[name] = weights.get(name, 0.0) + w
        result.sums, result.weights = sums, weights
        for name, total in sums.items():
            if weights[name] > 0:
                result.means[name] = mean_from_sum(total, weights[name], self._current)
        if self.placement is None:  # simulation: the server keeps what the clients saved
            for client in result.clients:
                if client.state:
                    self.client_state.setdefault(client.client_id, {}).update(client.state)
        return result

    def _report(self, kind: str, server_round: int, result: RoundResult) -> None:
        if self.listener is not None:
            self.listener(kind, server_round, result)

    # ---- Flower's message-API Strategy ---------------------------------------------------
    def update_availability(self, grid: Grid) -> None:
        """Deployed: note which clients' nodes are online (see `CohortSampler.set_online`)."""
        if self.placement is not None:
            online = set(grid.get_node_ids())
            self.sampler.set_online([c for c, node in self.placement.items() if node in online])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = from_record(arrays)
        self.update_availability(grid)
        self._system = self.sampler.train_round(server_round)
        tasks = self.tasks(server_round, self._current, self._system.participants,
                           len(list(grid.get_node_ids())), train=True)
        return self.messages(tasks, grid, MessageType.TRAIN, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's new global model and the round's metrics."""
        return self.finish_train(server_round, self.unpack(self.replies(replies)))

    def finish_train(self, server_round: int, result: RoundResult
                     ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's new global model and the round's metrics from the unpacked replies
        (whose means secure aggregation fills in itself)."""
        received = self.split_received(result)
        result.skipped = dict(self._system.skipped)
        self.simulated_clock += self._system.simulated_seconds
        skipped = list(result.skipped.values())
        metrics = {"train_loss": result.weighted_metric("train_loss"),
                   "num_clients": float(len(result.clients)),
                   "num_failures": float(len(result.failures)),
                   "num_dropped": float(skipped.count("dropped")),
                   "num_timed_out": float(skipped.count("timed out")),
                   "simulated_seconds": self._system.simulated_seconds,
                   "simulated_clock": self.simulated_clock}
        for add_on in self.add_ons:
            metrics.update(add_on.on_round(server_round, self._current, result))
        new = None
        if result.clients or "model" in result.means:  # DP on an empty Poisson cohort: noise
            new, extra = self.method.aggregate(server_round, self._current, result)
            metrics.update(extra)
        if received.clients:  # round server_round - 1's client evaluation, for its row
            metrics.update({RECEIVED + k: v for k, v in self.evaluation_metrics(received).items()})
            self._report("received", server_round - 1, received)
        self._report("train", server_round, result)
        return (to_record(new) if new is not None else None), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.update_availability(grid)
        tasks = self.tasks(server_round, from_record(arrays), self.sampler.evaluation_cohort(server_round),
                           len(list(grid.get_node_ids())), train=False)
        return self.messages(tasks, grid, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client-side evaluation metrics, and fairness across and within clients when the
        clients hold a sensitive attribute."""
        result = self.unpack(self.replies(replies))
        self._report("evaluate", server_round, result)
        return MetricRecord(self.evaluation_metrics(result))

    def evaluation_metrics(self, result: RoundResult) -> dict[str, float]:
        """A client evaluation's round metrics: loss and accuracy weighted by test examples and
        the spread of accuracy over clients, for the global model and (personal methods) the
        personal models, and fairness across and within clients when they hold a sensitive
        attribute."""
        metrics = {"client_eval_loss": result.weighted_metric("eval_loss", "num_test_examples"),
                   "client_eval_accuracy": result.weighted_metric("eval_accuracy", "num_test_examples"),
                   "client_eval_failures": float(len(result.failures))}
        accuracy = [c.metrics["eval_accuracy"] for c in result.clients if "eval_accuracy" in c.metrics]
        if accuracy:
            metrics.update({f"client_eval_accuracy_{k}": v for k, v in spread(accuracy).items()})
        metrics.update(personal_round_metrics(result, self.class_groups))
        counts = {c.client_id: counts_from_metrics(c.metrics) for c in result.clients}
        counts = {cid: c for cid, c in counts.items() if c is not None}
        if counts:
            metrics.update(fairness_metrics(counts))
        return metrics

    # ---- the setup phase (before round 1) ------------------------------------------------
    def configure_setup(self, grid: Grid) -> list[Message]:
        """Every client reports to the components that have a setup phase (GGEUR)."""
        self.update_availability(grid)
        cohort = [int(c) for c in self.sampler.population()]
        tasks = self.tasks(0, {}, cohort, len(list(grid.get_node_ids())), train=False)
        return self.messages(tasks, grid, f"query.{SETUP_ACTION}", 0)

    def aggregate_setup(self, replies: Iterable[Message]) -> dict[str, Any]:
        """Hand each component its clients' reports; returns what each says about its setup."""
        result = self.unpack(self.replies(replies))
        if result.failures:
            cid, error = next(iter(result.failures.items()))
            raise FedsimError(f"the setup phase failed on {len(result.failures)} client(s), "
                               f"e.g. client {cid}: {error}")
        summaries = {}
        for component in self.components:
            if component.has_setup_phase:
                label = component.label()
                reports = {c.client_id: c.outputs[label] for c in result.clients}
                summaries[label] = component.server_setup(reports)
        return summaries

    def summary(self) -> None:
        """Flower hook; fedsim records its settings in the run directory instead."""
