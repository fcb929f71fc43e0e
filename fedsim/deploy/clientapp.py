"""The ClientApp a SuperNode runs: one real client whose data the node config points at.

Flower starts a new process for every message in deployment, so each message reads the node's
data file again (a demo partition is built once and cached as a file) and rebuilds the small
model; the client's persistent state (e.g. SCAFFOLD's control variate) lives in `Context.state`.
"""

from __future__ import annotations

from flwr.app import Context, Message

from clients.runtime import Resident, worker_device, worker_model
from clients.state import RecordStateStore, StateStore
from fedsim.app import make_client_app
from fedsim.config import ExperimentConfig, validate_config
from fedsim.deploy.node_data import NodeData, load_node_data
from fedsim.deploy.roster import ROSTER_ACTION, describe_node, request_experiment
from fedsim.deploy.secure_aggregation import secure_aggregation_mod
from fedsim.engine.protocol import Task


class NodeHost:
    """A deployed node's data (from its node config) and its client's state (in Context.state)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def node(self, config: ExperimentConfig) -> NodeData:
        return load_node_data(dict(self.context.node_config), config)

    def resident(self, config: ExperimentConfig, task: Task) -> Resident:
        info = task.data_info
        device = worker_device(config)
        model = worker_model(config, tuple(info["input_shape"]), int(info["num_classes"]))
        node = self.node(config).shaped(tuple(info["input_shape"]))
        return Resident(node, model, device, None, int(info["num_classes"]), int(info["num_groups"]),
                        config.model, tuple(info["input_shape"]), config.experiment.seed)

    def state_store(self, task: Task) -> StateStore:
        return RecordStateStore(self.context.state)


app = make_client_app(NodeHost, train_mods=[secure_aggregation_mod])


@app.query(ROSTER_ACTION)
def roster(msg: Message, context: Context) -> Message:
    """Tell the server which client this node holds and what its data look like."""
    config = validate_config(request_experiment(msg.content))
    return Message(content=describe_node(NodeHost(context).node(config)), reply_to=msg)
