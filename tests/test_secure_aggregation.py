"""Secure aggregation (SecAgg+) on the deployed path, in one process: the deployment's server code
drives the deployed ClientApp (with its mods) on three nodes through a grid that calls the app,
so every message the server gets can be inspected."""

from __future__ import annotations

import copy
import uuid

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

from fedsim.config import load_config
from fedsim.deploy.clientapp import app as client_app
from fedsim.deploy.server import run_deployment
from fedsim.engine.inprocess import server_task_identity
from fedsim.errors import ConfigError

QUICKSTART = "experiments/quickstart.toml"


class NodesGrid(Grid):
    """Three nodes whose ClientApp runs at once on every message pushed to them; `fail` names
    (node, SecAgg+ stage) pairs at which a node drops out; `replies` keeps all the server got."""

    def __init__(self, tmp_path, fail: set[tuple[int, str]] = frozenset()) -> None:
        self.contexts = {node: Context(0, node, {"partition-id": node - 1, "cache-dir": str(tmp_path / "c")},
                                       RecordDict(), {}) for node in (1, 2, 3)}
        self.fail, self.replies, self._waiting = fail, [], {}

    def set_run(self, run_id):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs[Key.STAGE] if configs is not None else None
            if (node, stage) in self.fail:
                reply = Message(Error(1, "node dropped out"), reply_to=message)
            else:  # each node gets its own copy, as off the wire
                reply = client_app(copy.deepcopy(message), self.contexts[node])
            self.replies.append(reply)
            self._waiting[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._waiting.pop(i) for i in list(message_ids) if i in self._waiting]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def deploy(tmp_path, name: str, *overrides: str, fail=frozenset()):
    config = load_config(QUICKSTART, ["data.num_clients=3", "strategy.clients_per_round=3",
                                      "experiment.rounds=2", f"output.run_dir={tmp_path / name}", *overrides])
    grid = NodesGrid(tmp_path, fail)
    with server_task_identity():
        summary = run_deployment(config, grid)
    with np.load(summary.run_dir / "model.npz") as final:
        model = {k: final[k] for k in final.files}
    return model, pd.read_parquet(summary.run_dir / "rounds.parquet"), grid, summary.run_dir


def test_the_secure_sum_gives_the_plain_model_and_no_update_reaches_the_server(tmp_path):
    """One round: the model equals the plain one to SecAgg+'s stochastic quantization (each
    client's weighted entry rounds to one of 2^22 levels over [-8, 8]: at most 3 x 3.8e-6 over
    the weights' total of about 2 here); later rounds drift further, as training amplifies it."""
    plain, plain_rounds, _, _ = deploy(tmp_path, "plain", "experiment.rounds=1")
    secure, rounds, grid, run_dir = deploy(tmp_path, "secure", "deployment.secure_aggregation=true",
                                           "experiment.rounds=1")
    for key, value in plain.items():
        np.testing.assert_allclose(secure[key], value, atol=2e-5, rtol=0)
    assert not np.array_equal(secure["1.weight"], plain["1.weight"])  # quantized: not the same bits
    np.testing.assert_allclose(rounds["test_accuracy"], plain_rounds["test_accuracy"], atol=0.01)
    assert rounds["secure_aggregation_clients"].dropna().tolist() == [3.0]
    trained = [r for r in grid.replies
               if not r.has_error() and RECORD_KEY_CONFIGS in r.content.config_records]
    assert len(trained) == 3 * 4  # three nodes, four SecAgg+ stages
    for reply in trained:  # no array of a client's reaches the server unmasked
        arrays = [r for r in reply.content.values() if isinstance(r, ArrayRecord)]
        assert all(len(record) == 0 for record in arrays)
    assert "secure aggregation (SecAgg+)" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize("stage", ["collect_masked_vectors", "unmask"])
def test_a_node_that_drops_mid_round_does_not_stop_it(tmp_path, stage):
    """Node 2 drops at round 1's training stage (its update is left out) or after sending its
    masked update (its masks are rebuilt from its neighbours' shares): the round completes."""
    model, rounds, grid, _ = deploy(tmp_path, stage, "deployment.secure_aggregation=true",
                                    fail={(2, stage)})
    first = rounds[rounds["round"] == 1].iloc[0]
    assert first["secure_aggregation_clients"] == (2.0 if stage == "collect_masked_vectors" else 3.0)
    assert np.isfinite(first["test_accuracy"]) and first["test_accuracy"] > rounds["test_accuracy"].iloc[0]
    assert all(np.isfinite(v).all() for v in model.values())


def test_secure_aggregation_refuses_what_a_sum_cannot_serve(tmp_path):
    for overrides, match in ((["strategy.name=scaffold"], "needs more than the weighted sum"),
                             (["strategy.name=fedper"], "personal layers"),
                             (["strategy.clients_per_round=1"], "at least two clients"),
                             (["data.num_clients=5", "strategy.clients_per_round=5",
                               "deployment.secagg_quantization_bits=30"], "at most 29 bits")):
        config = load_config(QUICKSTART, ["data.num_clients=3", "strategy.clients_per_round=3",
                                          "deployment.secure_aggregation=true", *overrides])
        with pytest.raises(ConfigError, match=match), server_task_identity():
            run_deployment(config, NodesGrid(tmp_path))
