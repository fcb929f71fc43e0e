"""The usual way to use Flower: one node per client and Flower's own FedAvg (for the benchmark).

The ClientApp lives in this importable module so that its data cache persists per Ray actor.
"""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from clients.training import train_locally
from fedsim.config import validate_config
from fedsim.data.federation import build_federation
from fedsim.data.tensors import LocalData
from fedsim.models import build_model

app = ClientApp()
_CACHE: dict = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = validate_config(json.loads(msg.content["config"]["spec"]))
    torch.set_num_threads(1)
    if "model" not in _CACHE:
        fed = build_federation(config.data, config.experiment.seed)
        _CACHE["fed"] = fed
        _CACHE["model"] = build_model(config.model, fed.input_shape, fed.num_classes, 0)
    fed, model = _CACHE["fed"], _CACHE["model"]
    cid = int(context.node_config["partition-id"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = fed.client_data(cid)
    train_locally(model, LocalData.from_arrays(data), config.client, [], seed=cid, lr=config.client.lr)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(data.y_train)})})
    return Message(content=content, reply_to=msg)


def run(config, initial: dict[str, torch.Tensor]) -> list[float]:
    """Run Flower's FedAvg with one node per client; returns the wall time of every round."""
    from flwr.simulation import run_simulation

    stamps: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=config.strategy.clients_per_round / config.data.num_clients,
                          fraction_evaluate=0.0, min_available_nodes=config.data.num_clients)

        def stamp(server_round: int, arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())

        strategy.start(grid, ArrayRecord(initial), num_rounds=config.experiment.rounds,
                       train_config=ConfigRecord({"spec": json.dumps(config.to_json_dict())}),
                       evaluate_fn=stamp)

    run_simulation(server, app, num_supernodes=config.data.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"address": "local", "num_cpus": config.engine.workers,
                                                 "log_to_driver": False}})
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
