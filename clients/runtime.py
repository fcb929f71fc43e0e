"""The worker runtime: trains or evaluates the virtual clients of one packed message.

In simulation each worker process keeps one resident model and the federation's data as tensors
on its device (a per-process cache); every client loads the global weights into that model in
place. A deployed node supplies its own client's data and state instead (a `Host`).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from clients.lockstep import lockstep_possible, lockstep_proximal_mu, train_in_lockstep
from clients.state import ClientScope, ShippedStateStore, StateStore
from clients.training import train_locally
from clients.vectorized import clients_per_chunk, train_vectorized, vectorize_blocker
from fedsim.config import ExperimentConfig, validate_config
from fedsim.data.federation import Federation, IndexedFederation, build_federation
from fedsim.data.tensors import LocalData
from fedsim.engine.aggregation import add_weighted
from fedsim.engine.protocol import RECEIVED, Task, WorkerResult, decode_task, encode_result
from fedsim.evaluation import evaluate, predict
from fedsim.fairness.groups import counts_to_metrics, group_confusion
from fedsim.method import ClientContext, ClientResult, Component, Method
from fedsim.models import build_model
from fedsim.personal import personal_report
from fedsim.registry import build_add_ons, build_method, build_terms
from fedsim.seeding import derive_seed


def worker_device(config: ExperimentConfig) -> torch.device:
    """The GPU when the worker was given a share of one and CUDA is there, else the CPU."""
    if config.engine.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def worker_model(config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The run's model on the worker's device, in channels-last order where engine.channels_last asks."""
    model = build_model(config.model, input_shape, num_classes, config.experiment.seed)
    model = model.to(worker_device(config))
    return model.to(memory_format=torch.channels_last) if config.engine.channels_last else model


@dataclass
class Resident:
    """What a worker process keeps between messages for one experiment."""

    federation: Federation  # or any object with `client_data(client_id) -> ClientData`
    model: nn.Module
    device: torch.device
    base: tuple[torch.Tensor, torch.Tensor] | None  # all training arrays, for indexed data
    num_classes: int
    num_groups: int  # sensitive groups (0 when the data have none)
    model_spec: Any = None  # how to build another model like `model` (a ModelSection)
    input_shape: tuple[int, ...] = ()
    seed: int = 0
    cache: dict[Any, Any] = field(default_factory=dict)  # the client halves' per-process scratch

    def client_data(self, client_id: int) -> LocalData:
        fed = self.federation
        if isinstance(fed, IndexedFederation) and self.base is not None:
            x, y = self.base
            train = torch.as_tensor(fed.train_idx[client_id], device=self.device)
            test = torch.as_tensor(fed.test_idx[client_id], device=self.device)
            groups = [None if z is None else torch.as_tensor(z, device=self.device)
                      for z in fed.client_groups(client_id)]
            unlabeled = None if fed.unlabeled_idx is None else x[
                torch.as_tensor(fed.unlabeled_idx[client_id], device=self.device)]
            return LocalData(x[train], y[train], x[test], y[test], *groups, x_unlabeled=unlabeled)
        return LocalData.from_arrays(fed.client_data(client_id), self.device)

    def new_model(self) -> nn.Module:
        """Another model of the run's architecture (e.g. MOON's frozen copies)."""
        return build_model(self.model_spec, self.input_shape, self.num_classes,
                           self.seed).to(self.device)

    def load_global(self, arrays: dict[str, torch.Tensor]) -> None:
        """Copy the global weights into the resident model in place."""
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(arrays[name])


_RESIDENT: dict[str, Resident] = {}


def resident_for(config: ExperimentConfig) -> Resident:
    """The cached data and model for this experiment in this process (built on first use)."""
    key = json.dumps([config.data.model_dump(mode="json"), config.model.model_dump(mode="json"),
                      config.experiment.seed, config.engine.gpus_per_worker, config.engine.channels_last])
    if key not in _RESIDENT:
        if config.engine.backend == "ray":  # a worker process owns cpus_per_worker cores
            torch.set_num_threads(max(1, int(config.engine.cpus_per_worker)))
        fed = build_federation(config.data, config.experiment.seed)
        device = worker_device(config)
        model = worker_model(config, tuple(fed.input_shape), fed.num_classes)
        base = None
        if isinstance(fed, IndexedFederation):
            base = (torch.as_tensor(fed.dataset.x_train, device=device),
                    torch.as_tensor(fed.dataset.y_train, device=device))
        dataset = getattr(fed, "dataset", None)
        groups = len(dataset.sensitive_groups) if dataset is not None else 0
        _RESIDENT.clear()
        _RESIDENT[key] = Resident(fed, model, device, base, fed.num_classes, groups, config.model,
                                  tuple(fed.input_shape), config.experiment.seed)
    return _RESIDENT[key]


class Host(Protocol):
    """Where a worker gets its resident data and model, and its clients' persistent state."""

    def resident(self, config: ExperimentConfig, task: Task) -> Resident:
        ...

    def state_store(self, task: Task) -> StateStore:
        ...


class SimulationHost:
    """A simulation worker: the whole federation cached per process; each client's state comes
    with its task and goes back with its reply (the server keeps it)."""

    def resident(self, config: ExperimentConfig, task: Task) -> Resident:
        return resident_for(config)

    def state_store(self, task: Task) -> StateStore:
        return ShippedStateStore(task)


SIMULATION = SimulationHost()


def _tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}


def error_line(exc: Exception) -> str:
    """An exception as one short line for the run's log."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def fairness_counts(res: Resident, data: LocalData, split: str, prefix: str = "") -> dict[str, float]:
    """Confusion counts per sensitive group of the resident model on the client's training data
    or local test split (none when the data have no groups)."""
    x, y, z = (data.x_train, data.y_train, data.z_train) if split == "train" else (
        data.x_test, data.y_test, data.z_test)
    if z is None:
        return {}
    return counts_to_metrics(group_confusion(y.cpu().numpy(), predict(res.model, x).cpu().numpy(),
                                             z.cpu().numpy(), res.num_groups, res.num_classes), prefix=prefix)


def global_model_report(res: Resident, data: LocalData) -> dict[str, float]:
    """What the received global model does on this client's training data, before training:
    its mean loss, and its confusion counts per sensitive group (prefixed `pre_`)."""
    return {"global_train_loss": evaluate(res.model, data.x_train, data.y_train)["loss"],
            **fairness_counts(res, data, "train", prefix="pre_")}


@dataclass
class Prepared:
    """One client ready to train: its contexts (method first, then add-ons), data, loss terms,
    seed, and the global model's report on its data when the method asks for one."""

    client_id: int
    contexts: list[ClientContext]
    data: LocalData
    terms: list
    seed: int
    before: dict[str, float]


@dataclass
class Worker:
    """One message's work: the decoded task, the run's method and add-ons (client halves), the
    resident data and model, and the clients' state store."""

    task: Task
    config: ExperimentConfig
    res: Resident
    method: Method
    add_ons: list[Component]
    store: StateStore
    notes: list[str] = field(default_factory=list)  # for the run's log (why clients train one by one)

    @classmethod
    def start(cls, content: RecordDict, host: Host) -> Worker:
        task = decode_task(content)
        config = validate_config(task.experiment)
        return cls(task, config, host.resident(config, task), build_method(config),
                   build_add_ons(config), host.state_store(task))

    @property
    def components(self) -> list[Component]:
        return [self.method, *self.add_ons]

    @cached_property
    def broadcast(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each component's broadcast arrays as tensors on the device, once per message."""
        return {label: _tensors(arrays, self.res.device) for label, arrays in self.task.broadcast.items()}

    def contexts(self, index: int, global_arrays: dict[str, torch.Tensor]) -> list[ClientContext]:
        """Client `index`'s context for the method and for each add-on (each sees its own
        broadcast and its own slice of the client's state)."""
        client = self.task.clients[index]
        plan = self.method.Plan.model_validate(client.plan)
        out = []
        for component in self.components:
            label = component.label()
            out.append(ClientContext(client.client_id, self.task.round, plan, global_arrays,
                                     self.broadcast.get(label, {}),
                                     ClientScope(self.store, client.client_id, label),
                                     self.config.client, self.config.client.lr, self.config.experiment.seed,
                                     self.res.num_classes, model_factory=self.res.new_model,
                                     cache=self.res.cache))
        return out

    def loss_terms(self, contexts: list[ClientContext]) -> list:
        """`client.objectives` first (each with its own slice of the client's state), then the
        method's and the add-ons' terms."""
        method_ctx = contexts[0]

        def context_for(name: str) -> ClientContext:
            store = ClientScope(self.store, method_ctx.client_id, f"objective/{name}")
            return replace(method_ctx, broadcast={}, store=store)

        terms = build_terms(self.config, context_for)
        for component, ctx in zip(self.components, contexts, strict=True):
            terms += component.loss_terms(ctx)
        return terms

    def prepare(self, index: int, global_arrays: dict[str, torch.Tensor]) -> Prepared:
        """Client `index` ready to train: its contexts, its data after the components' data hooks,
        its loss terms and seed, and (for methods that ask) the global model's report on it.
        Leaves the global model in the resident model."""
        client, res = self.task.clients[index], self.res
        res.load_global(global_arrays)
        contexts = self.contexts(index, global_arrays)
        data = res.client_data(client.client_id)
        for component, ctx in zip(self.components, contexts, strict=True):
            ctx.unlabeled = data.x_unlabeled
            data = component.training_data(ctx, data)
        for ctx in contexts:
            ctx.labels = data.y_train
        before = global_model_report(res, data) if self.method.evaluates_global else {}
        if self.task.evaluate_first:
            local = self.evaluation(contexts[0], res.client_data(client.client_id), global_arrays)
            before.update({RECEIVED + key: value for key, value in local.items()})
        seed = derive_seed(self.config.experiment.seed, self.task.round, client.client_id)
        return Prepared(client.client_id, contexts, data, self.loss_terms(contexts), seed, before)

    def evaluation(self, ctx: ClientContext, data: LocalData,
                   global_arrays: dict[str, torch.Tensor]) -> dict[str, float]:
        """The global model (in the resident model) on the client's local test split, and for a
        personal method the client's personal model too; leaves the global model in place."""
        metrics = local_evaluation(self.res, data, self.config.evaluation.fairness_data)
        if self.method.personalizes:
            if self.method.personal_model(ctx, self.res.model, data):
                metrics.update(personal_report(self.res.model, data, self.res.num_classes))
            self.res.load_global(global_arrays)
        return metrics

    def finish(self, client: Prepared, metrics: dict[str, float]) -> ClientResult:
        """The reply of a client whose trained weights are in the resident model: the components'
        after-training hooks, its model as they leave it (unless one sends a model of its own) and
        the state it saved."""
        metrics = {**metrics, **client.before}
        model, outputs = self.res.model, {}
        steps, examples = int(metrics["steps"]), int(metrics["num_examples"])
        for component, ctx in zip(self.components, client.contexts, strict=True):
            ctx.steps, ctx.num_examples = steps, examples
            update = component.after_training(ctx, model)
            outputs.update(update.outputs)
            metrics.update(update.metrics)
            if update.pseudo_labels is not None:
                metrics.update(score_pseudo_labels(self.res.federation, client.client_id,
                                                   *update.pseudo_labels))
        sent = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        return ClientResult(client.client_id, metrics, {"model": sent, **outputs},
                            self.store.saved(client.client_id))

    def train_one(self, index: int, global_arrays: dict[str, torch.Tensor],
                  client: Prepared | None = None) -> ClientResult:
        """Client `index` trained alone (`client`: already prepared)."""
        client = client or self.prepare(index, global_arrays)
        steps = client.contexts[0].plan.local_steps
        trainer = next(((c, ctx) for c, ctx in zip(self.components, client.contexts, strict=True)
                        if c.replaces_training), None)
        if trainer is not None:
            component, ctx = trainer
            metrics = component.local_training(ctx, self.res.model, client.data, client.seed, steps,
                                                client.terms)
        else:
            metrics = train_locally(self.res.model, client.data, self.config.client, client.terms,
                                    client.seed, self.config.client.lr, steps=steps)
        return self.finish(client, metrics)

    def together(self, first: Prepared) -> str:
        """How this task's clients train together, judged from its first client (every client
        gets the same kinds of plan and loss terms): 'lockstep' (the hand-written kernels for
        Linear / ReLU models with SGD or Adam and at most a proximal term, the fastest for small models),
        'vectorize' (one torch.func program) or '' (one by one; when vectorizing was asked for,
        the reason is noted once)."""
        config = self.config
        if replacing := [c.label() for c in self.components if c.replaces_training]:
            self.notes.append(f"clients train one by one: {replacing[0]} trains each client itself")
            return ""
        if config.engine.lockstep and lockstep_possible(config) and lockstep_proximal_mu(
                [first.contexts[0].plan], [first.terms]) is not None:
            return "lockstep"
        if not (config.engine.vectorize == "on" or (config.engine.vectorize == "auto"
                                                    and self.res.device.type == "cuda")):
            return ""
        if reason := vectorize_blocker(self.res.model, [first.terms]):
            self.notes.append(f"clients train one by one: {reason}")
            return ""
        return "vectorize"

    def train_group(self, how: str, clients: list[Prepared],
                    global_arrays: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], dict]]:
        """Train prepared clients together: per client its trained parameters and metrics."""
        config, names = self.config, [name for name, _ in self.res.model.named_parameters()]
        data, seeds = [c.data for c in clients], [c.seed for c in clients]
        steps = [c.contexts[0].plan.local_steps for c in clients]
        terms = [c.terms for c in clients]
        if how == "lockstep":
            mus = lockstep_proximal_mu([c.contexts[0].plan for c in clients], terms)
            kernel = train_in_lockstep([global_arrays[n] for n in names], data, seeds,
                                       config.client.lr, steps, config.client, mus)
            return [(dict(zip(names, params, strict=True)), metrics) for params, metrics in kernel]
        if reason := vectorize_blocker(self.res.model, terms):
            raise ValueError(reason)
        return train_vectorized(self.res.model, {n: global_arrays[n] for n in names}, data, seeds, steps,
                                config.client, config.client.lr, terms)

    def train_together(self, global_arrays: dict[str, torch.Tensor],
                       failures: dict[int, str]) -> list[ClientResult] | None:
        """Every client of the task trained together (see `together`), in chunks that fit
        engine.vectorize_memory_mb, each prepared, trained and finished before the next, or one
        by one when they cannot; None when training together is off or pointless (one client).
        If training a chunk together fails, the clients not yet finished train one by one (which
        isolates a failing client in `failures`)."""
        count = len(self.task.clients)
        if count < 2 or not (self.config.engine.lockstep or self.config.engine.vectorize != "off"):
            return None
        first = self.prepare(0, global_arrays)
        how = self.together(first)
        if not how:
            return self.train_each(global_arrays, failures, first=first)
        chunk = count if how == "lockstep" else clients_per_chunk(
            self.res.model, first.data, first.terms, self.config.client,
            self.config.engine.vectorize_memory_mb * 2**20)
        results: list[ClientResult] = []
        for start in range(0, count, chunk):
            indices = range(start, min(start + chunk, count))
            try:
                clients = [first if i == 0 else self.prepare(i, global_arrays) for i in indices]
                trained = self.train_group(how, clients, global_arrays)
            except Exception as exc:  # a term vmap refuses, one client's data: isolate it
                self.notes.append("clients train one by one: training them together raised "
                                  + error_line(exc))
                return results + self.train_each(global_arrays, failures, range(start, count))
            for client, (params, metrics) in zip(clients, trained, strict=True):
                try:
                    self.res.load_global({**global_arrays, **params})
                    results.append(self.finish(client, metrics))
                except Exception as exc:
                    failures[client.client_id] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
        return results

    def train_each(self, global_arrays: dict[str, torch.Tensor], failures: dict[int, str],
                   indices: range | None = None, first: Prepared | None = None) -> list[ClientResult]:
        """The task's clients (or those at `indices`) trained one after another; one that raises
        is noted in `failures`. `first`: client 0 already prepared."""
        outcomes = []
        for index in indices if indices is not None else range(len(self.task.clients)):
            try:
                outcomes.append(self.train_one(index, global_arrays, first if index == 0 else None))
            except Exception as exc:  # a failing client must not take the others down
                failures[self.task.clients[index].client_id] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        return outcomes


def score_pseudo_labels(federation: Any, client_id: int, rows: np.ndarray,
                        labels: np.ndarray) -> dict[str, float]:
    """How many of the pseudo-labels a client gave were right (`pseudo_correct`), from the hidden
    labels only the simulator holds; nothing where they are unknown (a deployed node)."""
    hidden = getattr(federation, "hidden_labels", None)
    truth = hidden(client_id) if hidden is not None else None
    if truth is None:
        return {}
    given = labels >= 0
    return {"pseudo_correct": float((truth[rows[given]] == labels[given]).sum())}


def run_train(content: RecordDict, host: Host = SIMULATION) -> RecordDict:
    """Train every client of a packed task (in lockstep when the model and recipe allow); a
    client that raises is reported, the rest go on."""
    worker = Worker.start(content, host)
    global_arrays = _tensors(worker.task.global_arrays, worker.res.device)
    result = WorkerResult()
    outcomes = None
    try:
        outcomes = worker.train_together(global_arrays, result.failures)
    except Exception as exc:  # e.g. the first client's data hook: one by one isolates it
        traceback.print_exc()
        worker.notes.append(f"clients train one by one: {error_line(exc)}")
    if outcomes is None:
        outcomes = worker.train_each(global_arrays, result.failures)
    result.notes = worker.notes
    reduce = worker.task.reduce
    for outcome in outcomes:
        if reduce is not None:
            for name, weighting in reduce.items():
                weight = outcome.metrics["num_examples"] if weighting == "examples" else 1.0
                result.sums[name] = add_weighted(result.sums.get(name), outcome.outputs[name], weight)
                result.weights[name] = result.weights.get(name, 0.0) + weight
            outcome.outputs = {}
        result.clients.append(outcome)
    return encode_result(result)


def run_setup(content: RecordDict, host: Host = SIMULATION) -> RecordDict:
    """The setup phase before round 1: each packed client's report for every method or add-on
    that has one (GGEUR's class statistics), as outputs named after it."""
    worker = Worker.start(content, host)
    result = WorkerResult()
    for index, client in enumerate(worker.task.clients):
        data = worker.res.client_data(client.client_id)
        outputs = {}
        for component, ctx in zip(worker.components, worker.contexts(index, {}), strict=True):
            if component.has_setup_phase:
                outputs[component.label()] = component.client_setup(ctx, data)
        result.clients.append(ClientResult(client.client_id, {"num_examples": float(len(data.y_train))},
                                           outputs))
    return encode_result(result)


def run_evaluate(content: RecordDict, host: Host = SIMULATION) -> RecordDict:
    """Evaluate the global model on each listed client's local test split (and count its
    predictions per sensitive group where `evaluation.fairness_data` says); for a personal
    method, the client's personal model too (`personal_*` metrics)."""
    worker = Worker.start(content, host)
    global_arrays = _tensors(worker.task.global_arrays, worker.res.device)
    worker.res.load_global(global_arrays)
    result = WorkerResult()
    for index, client in enumerate(worker.task.clients):
        try:
            reply = worker.evaluation(worker.contexts(index, global_arrays)[0],
                                      worker.res.client_data(client.client_id), global_arrays)
        except Exception as exc:
            worker.res.load_global(global_arrays)
            result.failures[client.client_id] = f"{type(exc).__name__}: {exc}"
            continue
        result.clients.append(ClientResult(client.client_id, reply))
    return encode_result(result)


def local_evaluation(res: Resident, data: LocalData, fairness_data: str) -> dict[str, float]:
    """The resident model on a client's local test split (and its predictions counted per
    sensitive group on the split `fairness_data` names)."""
    metrics = evaluate(res.model, data.x_test, data.y_test)
    return {"eval_loss": metrics["loss"], "eval_accuracy": metrics["accuracy"],
            "num_test_examples": metrics["num_examples"], **fairness_counts(res, data, fairness_data)}
