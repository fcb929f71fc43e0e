"""The packed message format: one message per worker carries many virtual clients.

Server -> worker (`encode_task`): the global arrays once, arrays broadcast to every client, and
for each client its id, its config and optional arrays of its own. Worker -> server
(`encode_result`): per client its metrics and either its output arrays, or (when the strategy
only needs weighted sums) one pre-aggregated sum per output for the whole worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

Arrays = dict[str, np.ndarray]

# How a worker weights each client's output when pre-aggregating ("examples" or "uniform").
WEIGHTINGS = ("examples", "uniform")


@dataclass
class ClientTask:
    """What one virtual client is told this round."""

    client_id: int
    config: dict[str, Any] = field(default_factory=dict)
    arrays: Arrays = field(default_factory=dict)


@dataclass
class Task:
    """What one worker is told: a round's work for several clients."""

    round: int
    experiment: dict[str, Any]
    global_arrays: Arrays
    clients: list[ClientTask]
    broadcast: Arrays = field(default_factory=dict)
    reduce: dict[str, str] | None = None  # output -> weighting; None: reply per client
    run_dir: str = ""
    data_info: dict[str, Any] = field(default_factory=dict)  # deployment: input_shape, classes


@dataclass
class ClientResult:
    """One client's reply: metrics (always) and output arrays (unless pre-aggregated)."""

    client_id: int
    metrics: dict[str, float]
    outputs: dict[str, Arrays] = field(default_factory=dict)


@dataclass
class WorkerResult:
    """One worker's reply: per-client results, failures, and optional pre-aggregated sums."""

    clients: list[ClientResult] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    sums: dict[str, Arrays] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def to_record(arrays: Arrays) -> ArrayRecord:
    """Named numpy arrays as a Flower ArrayRecord (order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """A Flower ArrayRecord as named numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


def encode_task(task: Task) -> RecordDict:
    content = RecordDict()
    content["global"] = to_record(task.global_arrays)
    content["broadcast"] = to_record(task.broadcast)
    content["task"] = ConfigRecord({
        "round": task.round,
        "experiment": json.dumps(task.experiment),
        "client_ids": [c.client_id for c in task.clients],
        "client_configs": json.dumps([c.config for c in task.clients]),
        "reduce": json.dumps(task.reduce),
        "run_dir": task.run_dir,
        "data_info": json.dumps(task.data_info),
    })
    for client in task.clients:
        if client.arrays:
            content[f"client.{client.client_id}"] = to_record(client.arrays)
    return content


def decode_task(content: RecordDict) -> Task:
    meta = content["task"]
    ids = [int(i) for i in meta["client_ids"]]
    configs = json.loads(meta["client_configs"])
    clients = [
        ClientTask(cid, cfg, from_record(content[f"client.{cid}"])
                   if f"client.{cid}" in content else {})
        for cid, cfg in zip(ids, configs, strict=True)
    ]
    return Task(
        round=int(meta["round"]),
        experiment=json.loads(meta["experiment"]),
        global_arrays=from_record(content["global"]),
        clients=clients,
        broadcast=from_record(content["broadcast"]),
        reduce=json.loads(meta["reduce"]),
        run_dir=str(meta["run_dir"]),
        data_info=json.loads(meta["data_info"]),
    )


def encode_result(result: WorkerResult) -> RecordDict:
    content = RecordDict()
    content["failures"] = ConfigRecord({str(cid): err for cid, err in result.failures.items()})
    for client in result.clients:
        content[f"metrics.{client.client_id}"] = MetricRecord(client.metrics)
        for name, arrays in client.outputs.items():
            content[f"output.{client.client_id}.{name}"] = to_record(arrays)
    for name, arrays in result.sums.items():
        content[f"sum.{name}"] = to_record(arrays)
    content["weights"] = MetricRecord(result.weights)
    return content


def decode_result(content: RecordDict) -> WorkerResult:
    result = WorkerResult(
        failures={int(cid): str(err) for cid, err in content["failures"].items()},
        weights={k: float(v) for k, v in content["weights"].items()},
    )
    outputs: dict[int, dict[str, Arrays]] = {}
    for key, record in content.items():
        kind, _, rest = key.partition(".")
        if kind == "sum":
            result.sums[rest] = from_record(record)
        elif kind == "output":
            cid, _, name = rest.partition(".")
            outputs.setdefault(int(cid), {})[name] = from_record(record)
    for key, record in content.items():
        kind, _, cid = key.partition(".")
        if kind == "metrics":
            metrics = {k: float(v) for k, v in record.items()}
            result.clients.append(ClientResult(int(cid), metrics, outputs.get(int(cid), {})))
    return result


def content_bytes(content: RecordDict) -> int:
    """Bytes a message's records occupy on the wire (arrays, metrics and configs)."""
    return int(sum(record.count_bytes() for record in content.values()))
