"""Who is in a deployed federation: every SuperNode reports its client id and data layout once,
before the first round, and the server maps client ids to nodes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.config import ExperimentConfig
from fedsim.deploy.node_data import NodeData
from fedsim.errors import FedsimError

ROSTER_ACTION = "fedsim_roster"  # messages of type query.fedsim_roster


def roster_request(config: ExperimentConfig) -> RecordDict:
    """What a node needs to find its data: the experiment (seed, dataset and partition)."""
    return RecordDict({"request": ConfigRecord({"experiment": json.dumps(config.to_json_dict())})})


def request_experiment(content: RecordDict) -> dict:
    return json.loads(str(content["request"]["experiment"]))


def describe_node(node: NodeData) -> RecordDict:
    """A node's reply: its client id, sizes, input shape, label counts and sensitive groups."""
    data = node.data
    groups = 0 if data.z_train is None else int(np.max(data.z_train, initial=-1)) + 1
    return RecordDict({
        "sizes": MetricRecord({"client_id": node.client_id, "num_examples": len(data.y_train),
                               "num_test_examples": len(data.y_test)}),
        "layout": ConfigRecord({"input_shape": [int(d) for d in data.x_train.shape[1:]],
                                "label_counts": np.bincount(data.y_train).astype(int).tolist(),
                                "num_groups": groups}),
    })


@dataclass
class Roster:
    """The federation as its nodes describe it; clients are numbered 0..N-1."""

    node_of: dict[int, int]  # client id -> node id
    sizes: np.ndarray  # training examples per client
    label_counts: np.ndarray  # clients x classes
    input_shape: tuple[int, ...]
    num_groups: int

    @property
    def num_classes(self) -> int:
        return self.label_counts.shape[1]

    @classmethod
    def from_replies(cls, replies: Iterable[Message], expected: int) -> Roster:
        """Check the replies (no errors, distinct ids 0..N-1, one input shape) and combine them."""
        described: dict[int, tuple[int, RecordDict]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise FedsimError(f"SuperNode {node} could not describe its data: {reply.error.reason}")
            cid = int(reply.content["sizes"]["client_id"])
            if cid in described:
                raise FedsimError(f"SuperNodes {described[cid][0]} and {node} both hold client "
                                  f"{cid}; give every node its own client-id")
            described[cid] = (node, reply.content)
        if sorted(described) != list(range(expected)):
            raise FedsimError(f"the SuperNodes hold clients {sorted(described)}, expected 0..{expected - 1} "
                              "(data.num_clients); give the nodes client-id 0..N-1")
        shapes = {tuple(described[c][1]["layout"]["input_shape"]) for c in described}
        if len(shapes) != 1:
            raise FedsimError(f"the SuperNodes' data have different input shapes: {sorted(shapes)}")
        counts = [list(described[c][1]["layout"]["label_counts"]) for c in range(expected)]
        width = max(len(c) for c in counts)
        return cls(
            node_of={c: described[c][0] for c in range(expected)},
            sizes=np.array([int(described[c][1]["sizes"]["num_examples"]) for c in range(expected)]),
            label_counts=np.array([c + [0] * (width - len(c)) for c in counts], dtype=np.int64),
            input_shape=shapes.pop(),
            num_groups=max(int(described[c][1]["layout"]["num_groups"]) for c in range(expected)),
        )
