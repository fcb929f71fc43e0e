"""The packed message format: one message per worker carries many virtual clients.

Server -> worker (`encode_task`): the global arrays once, the arrays each method and add-on
broadcasts, and for each client its id, its plan and (in simulation) its saved state. Worker ->
server (`encode_result`): per client its metrics, its new state, and either its output arrays or
(when the method only needs weighted sums) one pre-aggregated sum per output for the worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.method import Arrays, ClientResult

SEPARATOR = "::"  # joins a named group and an array name into one record key
RECEIVED = "received."  # prefixes a client's metrics of the global model it received, measured
# on its local test split before training (evaluation.with_training)


@dataclass
class ClientTask:
    """What one virtual client is told this round: its plan and (simulation) its saved state."""

    client_id: int
    plan: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Arrays] = field(default_factory=dict)


@dataclass
class Task:
    """What one worker is told: a round's work for several clients."""

    round: int
    experiment: dict[str, Any]
    global_arrays: Arrays
    clients: list[ClientTask]
    broadcast: dict[str, Arrays] = field(default_factory=dict)  # per method / add-on
    reduce: dict[str, str] | None = None  # output -> weighting; None: reply per client
    data_info: dict[str, Any] = field(default_factory=dict)  # deployment: input_shape, classes
    evaluate_first: bool = False  # training: clients first evaluate the global model they receive


@dataclass
class WorkerResult:
    """One worker's reply: per-client results, failures, and optional pre-aggregated sums."""

    clients: list[ClientResult] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    sums: dict[str, Arrays] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for the run's log


def to_record(arrays: Arrays) -> ArrayRecord:
    """Named numpy arrays as a Flower ArrayRecord (order kept)."""
    # np.asarray keeps a 0-d array 0-d (BatchNorm's step counter); ascontiguousarray makes it 1-d
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """A Flower ArrayRecord as named numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


def to_grouped_record(groups: dict[str, Arrays]) -> ArrayRecord:
    """Named groups of named arrays as one ArrayRecord (keys `group::array`)."""
    return to_record({f"{g}{SEPARATOR}{k}": v for g, arrays in groups.items() for k, v in arrays.items()})


def from_grouped_record(record: ArrayRecord) -> dict[str, Arrays]:
    groups: dict[str, Arrays] = {}
    for key, value in from_record(record).items():
        group, _, name = key.partition(SEPARATOR)
        groups.setdefault(group, {})[name] = value
    return groups


def encode_task(task: Task) -> RecordDict:
    content = RecordDict()
    content["global"] = to_record(task.global_arrays)
    content["broadcast"] = to_grouped_record(task.broadcast)
    content["task"] = ConfigRecord({
        "round": task.round,
        "experiment": json.dumps(task.experiment),
        "client_ids": [c.client_id for c in task.clients],
        "plans": json.dumps([c.plan for c in task.clients]),
        "reduce": json.dumps(task.reduce),
        "data_info": json.dumps(task.data_info),
        "evaluate_first": task.evaluate_first,
    })
    for client in task.clients:
        if client.state:
            content[f"state.{client.client_id}"] = to_grouped_record(client.state)
    return content


def decode_task(content: RecordDict) -> Task:
    meta = content["task"]
    ids = [int(i) for i in meta["client_ids"]]
    plans = json.loads(meta["plans"])
    clients = [ClientTask(cid, plan, from_grouped_record(content[f"state.{cid}"])
                          if f"state.{cid}" in content else {})
               for cid, plan in zip(ids, plans, strict=True)]
    return Task(
        round=int(meta["round"]),
        experiment=json.loads(meta["experiment"]),
        global_arrays=from_record(content["global"]),
        clients=clients,
        broadcast=from_grouped_record(content["broadcast"]),
        reduce=json.loads(meta["reduce"]),
        data_info=json.loads(meta["data_info"]),
        evaluate_first=bool(meta["evaluate_first"]),
    )


def encode_result(result: WorkerResult) -> RecordDict:
    content = RecordDict()
    content["failures"] = ConfigRecord({str(cid): err for cid, err in result.failures.items()})
    for client in result.clients:
        content[f"metrics.{client.client_id}"] = MetricRecord(client.metrics)
        for name, arrays in client.outputs.items():
            content[f"output.{client.client_id}.{name}"] = to_record(arrays)
        if client.state:
            content[f"state.{client.client_id}"] = to_grouped_record(client.state)
    for name, arrays in result.sums.items():
        content[f"sum.{name}"] = to_record(arrays)
    content["weights"] = MetricRecord(result.weights)
    content["notes"] = ConfigRecord({str(i): note for i, note in enumerate(result.notes)})
    return content


def decode_result(content: RecordDict) -> WorkerResult:
    result = WorkerResult(
        failures={int(cid): str(err) for cid, err in content["failures"].items()},
        weights={k: float(v) for k, v in content["weights"].items()},
        notes=[str(note) for note in content["notes"].values()] if "notes" in content else [],
    )
    outputs: dict[int, dict[str, Arrays]] = {}
    states: dict[int, dict[str, Arrays]] = {}
    for key, record in content.items():
        kind, _, rest = key.partition(".")
        if kind == "sum":
            result.sums[rest] = from_record(record)
        elif kind == "output":
            cid, _, name = rest.partition(".")
            outputs.setdefault(int(cid), {})[name] = from_record(record)
        elif kind == "state":
            states[int(rest)] = from_grouped_record(record)
    for key, record in content.items():
        kind, _, cid = key.partition(".")
        if kind == "metrics":
            metrics = {k: float(v) for k, v in record.items()}
            result.clients.append(ClientResult(int(cid), metrics, outputs.get(int(cid), {}),
                                               states.get(int(cid), {})))
    return result


def content_bytes(content: RecordDict) -> int:
    """Bytes a message's records occupy on the wire (arrays, metrics and configs)."""
    return int(sum(config_bytes(record) if isinstance(record, ConfigRecord) else record.count_bytes()
                   for record in content.values()))


def config_bytes(record: ConfigRecord) -> int:
    """A ConfigRecord's bytes as Flower counts them (keys, strings and bytes by length, numbers
    8, booleans 1), also for the empty lists and strings SecAgg+ sends, which Flower's own
    `count_bytes` cannot count."""
    def size(value) -> int:
        return len(value) if isinstance(value, str | bytes) else 1 if isinstance(value, bool) else 8

    return sum(len(key) + sum(size(v) for v in (value if isinstance(value, list) else [value]))
               for key, value in record.items())
