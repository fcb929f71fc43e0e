"""Running an experiment on deployed SuperNodes, each holding one client.

The round loop, strategies and run directory are the simulation's; what differs: the clients are
the connected nodes (a roster query maps client ids to nodes before the first round), each task
goes to its client's node, and the central test set is whatever the server holds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedsim.config import ExperimentConfig
from fedsim.data.federation import build_federation
from fedsim.deploy.node_data import read_data_file
from fedsim.deploy.roster import ROSTER_ACTION, Roster, roster_request
from fedsim.deploy.secure_aggregation import SecureAggregationTransport, check_secure_aggregation
from fedsim.engine.server import CentralEvaluator, ProgressCallback
from fedsim.engine.transports import GridTransport, send_and_receive, wait_for_nodes
from fedsim.errors import ConfigError, FedsimError
from fedsim.models import build_model
from fedsim.registry import build_add_ons, build_method, check_config
from fedsim.runner import RunSummary, execute

PULL_INTERVAL = 0.1  # seconds between the server's pulls of replies from the SuperLink


def check_deployable(config: ExperimentConfig) -> None:
    """Refuse what needs every client's data in one place (simulation only), and what the
    privacy accountant cannot account for when nodes come and go."""
    if config.evaluation.decomposition:
        raise ConfigError("evaluation.decomposition needs every client's data on the server; "
                          "it is a simulation-only analysis: set it to false to deploy")
    if config.data.embedding == "warmup":
        raise ConfigError("data.embedding = 'warmup' trains its encoder in a simulation; deploy "
                          "with a saved encoder file instead (data.embedding = 'path/to/encoder.pt')")
    if config.privacy.enabled and config.strategy.sampling == "fixed":
        raise ConfigError("privacy.enabled when deployed needs strategy.sampling = 'poisson': with "
                          "nodes offline, fixed-size cohorts sample the online clients at a higher "
                          "rate than the accountant's cohort / num_clients")


def collect_roster(grid: Grid, config: ExperimentConfig) -> Roster:
    """Wait for data.num_clients SuperNodes and ask each which client it holds."""
    expected = config.data.num_clients
    try:
        nodes = wait_for_nodes(grid, expected, config.deployment.node_wait)
    except FedsimError as exc:
        raise FedsimError(f"{exc}: start {expected} SuperNodes (data.num_clients) or wait longer "
                          "(deployment.node_wait)") from None
    if len(nodes) > expected:
        raise FedsimError(f"{len(nodes)} SuperNodes are connected but data.num_clients = "
                          f"{expected}; set data.num_clients to the number of nodes")
    messages = [Message(content=roster_request(config), dst_node_id=node,
                        message_type=f"query.{ROSTER_ACTION}") for node in nodes]
    replies = send_and_receive(grid, messages, config.engine.timeout, PULL_INTERVAL)
    if len(replies) < len(nodes):
        raise FedsimError(f"only {len(replies)} of {len(nodes)} SuperNodes described their data "
                          f"within engine.timeout = {config.engine.timeout:.0f} s")
    return Roster.from_replies(replies, expected)


def central_evaluator(config: ExperimentConfig, roster: Roster
                      ) -> tuple[CentralEvaluator, tuple[int, ...], int]:
    """The server's test set, as `deployment.central_test` says, and the input shape and number
    of classes the model is built for (the dataset's when it is the test set: nodes reshape
    their examples to it, e.g. CSV rows to images)."""
    source = config.deployment.central_test
    if source == "dataset":
        federation = build_federation(config.data, config.experiment.seed)
        if math.prod(federation.input_shape) != math.prod(roster.input_shape):
            raise FedsimError(f"the nodes' examples have shape {roster.input_shape} but the "
                              f"experiment's dataset has {tuple(federation.input_shape)}")
        if roster.num_classes > federation.num_classes:
            raise FedsimError(f"the nodes hold labels up to {roster.num_classes - 1} but the "
                              f"dataset has {federation.num_classes} classes")
        evaluator = CentralEvaluator.build(config, federation)
        return evaluator, tuple(federation.input_shape), federation.num_classes
    model = build_model(config.model, roster.input_shape, roster.num_classes, config.experiment.seed)
    if source == "none":
        return CentralEvaluator(model, None, None), roster.input_shape, roster.num_classes
    data = read_data_file(source, config, client_id=-1)
    x, y, z = ((data.x_test, data.y_test, data.z_test) if len(data.y_test)
               else (data.x_train, data.y_train, data.z_train))
    if len(y) and int(y.max()) >= roster.num_classes:
        raise FedsimError(f"the server's test file {source} has labels up to {int(y.max())} but "
                          f"the nodes' only up to {roster.num_classes - 1}")
    evaluator = CentralEvaluator(model, torch.as_tensor(x), torch.as_tensor(y), z,
                                 roster.num_groups if z is not None else 0, config.evaluation.robust)
    return evaluator, roster.input_shape, roster.num_classes


def run_deployment(config: ExperimentConfig, grid: Grid,
                   progress: ProgressCallback | None = None) -> RunSummary:
    """Run `config` with the connected SuperNodes as its clients; write the run directory."""
    check_config(config)
    check_deployable(config)
    if config.deployment.secure_aggregation:
        check_secure_aggregation(config, build_method(config), build_add_ons(config))
    roster = collect_roster(grid, config)
    evaluator, input_shape, num_classes = central_evaluator(config, roster)
    data_info = {"input_shape": list(input_shape), "num_classes": num_classes,
                 "num_groups": max(roster.num_groups, evaluator.num_groups)}

    secure = config.deployment.secure_aggregation
    transport = SecureAggregationTransport if secure else GridTransport

    def start(strategy, loop) -> None:
        loop(transport(strategy, grid, config.engine.timeout, PULL_INTERVAL))

    counts = np.pad(roster.label_counts, ((0, 0), (0, num_classes - roster.num_classes)))
    return execute(config, evaluator, roster.sizes, counts, start, progress,
                   where=f"{len(roster.node_of)} SuperNodes"
                   + (", secure aggregation (SecAgg+)" if secure else ""),
                   placement={"placement": roster.node_of, "data_info": data_info})
