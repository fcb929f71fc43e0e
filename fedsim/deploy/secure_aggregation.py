"""Secure aggregation on deployed SuperNodes: Flower's SecAgg+ workflow on the server and its
client mod on the nodes, around fedsim's own training messages.

Server (`SecureAggregationTransport`): a training round is SecAgg+'s four stages (setup, share
keys, collect masked vectors, unmask). fedsim's packed task for each node rides in the third
stage's message. Each client replies with its metrics and, masked, its weighted model update
(trained minus received float arrays, times its weight), quantized by the mod; the server
unmasks only their sum, which it turns into the weighted mean update. A client that drops out
after the key exchange is left out of the sum: its masks are rebuilt from its neighbours' shares
as long as every client keeps `deployment.secagg_threshold` of them active.

Client (`secure_aggregation_mod`): on a SecAgg+ training message it runs `secaggplus_mod`
around fedsim's training handler and puts the client's update where the mod looks for it (the
legacy `fitres.*` records); the mod then empties every array record of the reply, so no array
of the client's leaves the node unmasked. Other messages pass through untouched.

SecAgg+ lives in Flower's legacy workflow API (a `LegacyContext` with a legacy `Strategy`), so
the server half hands it a small legacy strategy that only names the nodes and keeps the sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedsim.config import ExperimentConfig
from fedsim.engine.cohort import cohort_size
from fedsim.engine.protocol import content_bytes, from_record, to_record
from fedsim.engine.transports import GridTransport, send_and_receive
from fedsim.errors import ConfigError
from fedsim.method import Arrays

COLLECT_STAGE = 2  # SecAgg+'s stages: 0 setup, 1 share keys, 2 collect masked vectors, 3 unmask


def secured_names(arrays: Arrays) -> list[str]:
    """The arrays that go through the secure sum, in order: every float array (integer buffers,
    such as batch norm's step counter, keep the global model's value)."""
    return [name for name, value in arrays.items() if np.issubdtype(value.dtype, np.floating)]


def check_secure_aggregation(config: ExperimentConfig, method, add_ons) -> None:
    """Refuse what the sum of updates cannot serve: methods that need more than the weighted
    mean of the clients' models, add-ons, and cohorts of one."""
    method_name = config.strategy.name
    if method.per_client_updates or dict(method.outputs) != {"model": "examples"} or method.personalizes:
        raise ConfigError(f"deployment.secure_aggregation: strategy '{method_name}' needs more than "
                          "the weighted sum of the clients' models (every client's update, extra "
                          "outputs or personal layers); use one that aggregates a weighted mean "
                          "(fedavg, fedprox, fedavgm, fedadam, fedyogi, moon) or switch it off")
    if add_ons:
        raise ConfigError("deployment.secure_aggregation with "
                          f"{', '.join(a.label() for a in add_ons)}: add-ons are not supported under "
                          "secure aggregation; switch them or secure aggregation off")
    cohort = cohort_size(config, config.data.num_clients)
    if cohort < 2:
        raise ConfigError("deployment.secure_aggregation needs at least two clients a round "
                          "(strategy.clients_per_round): a sum of one update is that update")
    bits = config.deployment.secagg_quantization_bits
    if cohort * 2 ** bits >= 2 ** 32:
        raise ConfigError(f"deployment.secagg_quantization_bits = {bits}: the sum of {cohort} "
                          "clients' quantized updates would overflow SecAgg+'s 2^32 modulus; use "
                          f"at most {math.ceil(32 - math.log2(cohort)) - 1} bits")
    if config.evaluation.decomposition:
        raise ConfigError("deployment.secure_aggregation with evaluation.decomposition: the "
                          "decomposition needs every client's model")


# ---- client half ------------------------------------------------------------------------------
def offer_update(reply: RecordDict, task: RecordDict) -> None:
    """Add to a fedsim training reply the client's weighted-mean update where SecAgg+'s mod reads
    it (`fitres.parameters`, weight `fitres.num_examples`): its model (the reply's one-client sum
    over its weight) minus the global model it received, over the secured arrays."""
    failures = dict(reply["failures"])
    if failures or "sum.model" not in reply:
        raise RuntimeError(f"the client failed, so it has no update for the secure sum: {failures}")
    weight = float(reply["weights"]["model"])
    if weight <= 0:
        raise RuntimeError("the client has no training examples, so it has no update for the secure sum")
    received = from_record(task["global"])
    model = {k: v / weight for k, v in from_record(reply["sum.model"]).items()}
    update = [(model[k] - received[k]).astype(np.float64) for k in secured_names(received)]
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(round(weight)), {})
    for key, record in fitres_to_recorddict(result, keep_input=True).items():
        reply[key] = record


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: SecAgg+ for training messages that carry its configuration."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)

    def train_and_offer(message: Message, ctx: Context) -> Message:
        reply = call_next(message, ctx)
        if not reply.has_error():
            offer_update(reply.content, message.content)
        return reply

    return secaggplus_mod(msg, context, train_and_offer)


# ---- server half ------------------------------------------------------------------------------
class SumKeeper(LegacyStrategy):
    """The legacy strategy SecAgg+ drives: it names the round's nodes and keeps the unmasked
    weighted mean it is handed; fedsim's own strategy does everything else."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes = grid, nodes
        self.mean: list[np.ndarray] | None = None
        self.clients = 0

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, 0), FitIns(parameters, {})) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean, self.clients = parameters_to_ndarrays(results[0][1].parameters), len(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class FedsimSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ whose third-stage messages carry fedsim's task for each node instead of FitIns."""

    def __init__(self, tasks: dict[int, RecordDict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.tasks = tasks

    def setup_stage(self, grid, context, state) -> bool:
        proceed = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.tasks[nid] for nid in state.nid_to_fitins}
        return proceed


class StageGrid(Grid):
    """The deployment grid as SecAgg+ sees it: each stage's exchange pulls replies at fedsim's
    interval (Flower's own waits 3 s between pulls) and is kept for fedsim to read."""

    def __init__(self, grid: Grid, pull_interval: float) -> None:
        self.grid, self.pull_interval = grid, pull_interval
        self.exchanges: list[tuple[list[Message], list[Message]]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = send_and_receive(self.grid, messages, timeout or 3600.0, self.pull_interval)
        self.exchanges.append((messages, replies))
        return replies

    # the rest is the wrapped grid's
    def set_run(self, run_id):
        self.grid.set_run(run_id)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)


class SecureAggregationTransport(GridTransport):
    """Training rounds through SecAgg+; evaluation and the setup phase as in `GridTransport`."""

    def workflow(self, tasks: dict[int, RecordDict]) -> FedsimSecAggPlus:
        spec = self.strategy.config.deployment
        levels = 2 ** spec.secagg_quantization_bits
        return FedsimSecAggPlus(tasks, num_shares=spec.secagg_shares,
                                reconstruction_threshold=spec.secagg_threshold,
                                max_weight=float(max(self.strategy.sampler.client_sizes)),
                                clipping_range=spec.secagg_clipping_range, quantization_range=levels,
                                modulus_range=2 ** 32, timeout=self.timeout)

    def train(self, server_round: int, arrays: Arrays) -> tuple[Arrays | None, dict, int]:
        strategy = self.strategy
        messages = list(strategy.configure_train(server_round, to_record(arrays), ConfigRecord(), self.grid))
        tasks = {m.metadata.dst_node_id: m.content for m in messages}
        grid = StageGrid(self.grid, self.pull_interval)
        keeper = SumKeeper(grid, sorted(tasks))
        context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=keeper)
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()  # the tasks carry the model
        if len(tasks) >= 2:  # SecAgg+ needs two clients at least (fewer online: the round fails)
            self.workflow(tasks)(grid, context)
        replies = grid.exchanges[COLLECT_STAGE][1] if len(grid.exchanges) > COLLECT_STAGE else []
        result = strategy.unpack(strategy.replies(replies))
        result.sums, result.weights, result.means = {}, {}, {}
        if keeper.mean is not None:
            names = secured_names(arrays)
            mean = dict(arrays)
            mean.update({k: (arrays[k] + delta).astype(arrays[k].dtype)
                         for k, delta in zip(names, keeper.mean, strict=True)})
            result.means["model"] = mean
        else:  # halted: too few clients stayed; nobody's update is used
            reason = "secure aggregation halted: too few clients stayed for SecAgg+'s threshold"
            everyone = [*result.failures, *(c.client_id for c in result.clients)]
            result.failures = dict.fromkeys(everyone, reason)
            result.clients = []
        record, metrics = strategy.finish_train(server_round, result)
        size = sum(content_bytes(m.content) for sent, got in grid.exchanges
                   for m in [*sent, *(r for r in got if not r.has_error())])
        row = {**dict(metrics), "secure_aggregation_clients": float(keeper.clients)}
        return (from_record(record) if record is not None else None), row, size
