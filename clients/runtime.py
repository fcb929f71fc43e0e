"""The worker runtime: trains or evaluates the virtual clients of one packed message.

In simulation each worker process keeps one resident model and the federation's data as tensors
on its device (a per-process cache); every client loads the global weights into that model in
place. A deployed node supplies its own client's data and state instead (a `Host`).
"""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from clients.ggeur import augmented_training_set, class_statistics
from clients.lockstep import lockstep_proximal_mu, train_in_lockstep
from clients.objectives import ObjectiveContext, build_objectives
from clients.state import ClientStateStore, StateStore
from clients.training import LocalData, train_locally
from fedsim.config import ExperimentConfig, validate_config
from fedsim.data.federation import Federation, IndexedFederation, build_federation
from fedsim.engine.aggregation import add_weighted
from fedsim.engine.protocol import (
    Arrays,
    ClientResult,
    Task,
    WorkerResult,
    decode_task,
    encode_result,
)
from fedsim.evaluation import evaluate, predict
from fedsim.fairness.groups import counts_to_metrics, group_confusion
from fedsim.models import build_model
from fedsim.seeding import derive_seed


def worker_device(config: ExperimentConfig) -> torch.device:
    """The GPU when the worker was given a share of one and CUDA is there, else the CPU."""
    if config.engine.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Resident:
    """What a worker process keeps between messages for one experiment."""

    federation: Federation  # or any object with `client_data(client_id) -> ClientData`
    model: nn.Module
    device: torch.device
    base: tuple[torch.Tensor, torch.Tensor] | None  # all training arrays, for indexed data
    num_classes: int
    num_groups: int  # sensitive groups (0 when the data have none)
    augmented: dict[tuple, LocalData] = field(default_factory=dict)  # GGEUR top-ups, per client

    def client_data(self, client_id: int) -> LocalData:
        fed = self.federation
        if isinstance(fed, IndexedFederation) and self.base is not None:
            x, y = self.base
            train = torch.as_tensor(fed.train_idx[client_id], device=self.device)
            test = torch.as_tensor(fed.test_idx[client_id], device=self.device)
            groups = [None if z is None else torch.as_tensor(z, device=self.device)
                      for z in fed.client_groups(client_id)]
            return LocalData(x[train], y[train], x[test], y[test], *groups)
        return LocalData.from_arrays(fed.client_data(client_id), self.device)

    def load_global(self, arrays: dict[str, torch.Tensor]) -> None:
        """Copy the global weights into the resident model in place."""
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(arrays[name])


_RESIDENT: dict[str, Resident] = {}
GGEUR_STREAM = 0x6E0


def resident_for(config: ExperimentConfig) -> Resident:
    """The cached data and model for this experiment in this process (built on first use)."""
    key = json.dumps([config.data.model_dump(mode="json"), config.model.model_dump(mode="json"),
                      config.experiment.seed, config.engine.gpus_per_worker])
    if key not in _RESIDENT:
        if config.engine.backend == "ray":  # a worker process owns cpus_per_worker cores
            torch.set_num_threads(max(1, int(config.engine.cpus_per_worker)))
        fed = build_federation(config.data, config.experiment.seed)
        device = worker_device(config)
        model = build_model(config.model, fed.input_shape, fed.num_classes,
                            config.experiment.seed).to(device)
        base = None
        if isinstance(fed, IndexedFederation):
            base = (torch.as_tensor(fed.dataset.x_train, device=device),
                    torch.as_tensor(fed.dataset.y_train, device=device))
        dataset = getattr(fed, "dataset", None)
        groups = len(dataset.sensitive_groups) if dataset is not None else 0
        _RESIDENT.clear()
        _RESIDENT[key] = Resident(fed, model, device, base, fed.num_classes, groups)
    return _RESIDENT[key]


class Host(Protocol):
    """Where a worker gets its resident data and model, and its clients' persistent state."""

    def resident(self, config: ExperimentConfig, task: Task) -> Resident:
        ...

    def state_store(self, task: Task) -> StateStore:
        ...


class SimulationHost:
    """A simulation worker: the whole federation cached per process, state in the run directory."""

    def resident(self, config: ExperimentConfig, task: Task) -> Resident:
        return resident_for(config)

    def state_store(self, task: Task) -> StateStore:
        return ClientStateStore(task.run_dir)


SIMULATION = SimulationHost()


def _tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def global_model_report(res: Resident, data: LocalData) -> dict[str, float]:
    """What the received global model does on this client's training data, before training:
    its mean loss, and its confusion counts per sensitive group (prefixed `pre_`)."""
    report = {"global_train_loss": evaluate(res.model, data.x_train, data.y_train)["loss"]}
    if data.z_train is not None:
        report.update(counts_to_metrics(group_confusion(
            data.y_train.cpu().numpy(), predict(res.model, data.x_train).cpu().numpy(),
            data.z_train.cpu().numpy(), res.num_groups, res.num_classes), prefix="pre_"))
    return report


def ggeur_data(res: Resident, client_id: int, data: LocalData, shared: Arrays,
               config: ExperimentConfig) -> LocalData:
    """The client's training set topped up by GGEUR's geometric sampling (built once per set of
    shapes and settings, then cached)."""
    ggeur_keys = sorted(k for k in shared if k.startswith("ggeur."))
    fingerprint = hashlib.sha1(b"".join(np.ascontiguousarray(shared[k]).tobytes() for k in ggeur_keys))
    key = (client_id, fingerprint.hexdigest(), config.ggeur.scaling)
    if key not in res.augmented:
        rng = np.random.default_rng(derive_seed(config.experiment.seed, client_id, GGEUR_STREAM))
        x, y = augmented_training_set(data.x_train.cpu().numpy(), data.y_train.cpu().numpy(),
                                      client_id, shared, rng, config.ggeur.scaling)
        res.augmented[key] = LocalData(torch.as_tensor(x, device=res.device),
                                       torch.as_tensor(y, device=res.device),
                                       data.x_test, data.y_test, None, data.z_test)
    return res.augmented[key]


def run_statistics(content: RecordDict, host: Host = SIMULATION) -> RecordDict:
    """GGEUR's statistics phase: for each packed client, per class the count, sum and sum of
    outer products of its training features (classes under ggeur.min_count withheld, optional
    Gaussian noise on the sums); nothing per example."""
    task = decode_task(content)
    config = validate_config(task.experiment)
    res = host.resident(config, task)
    result = WorkerResult()
    for client in task.clients:
        data = res.client_data(client.client_id)
        x = data.x_train.cpu().numpy().reshape(len(data.y_train), -1)
        counts, sums, outers = class_statistics(x, data.y_train.cpu().numpy(), res.num_classes)
        withheld = counts < config.ggeur.min_count
        counts[withheld], sums[withheld], outers[withheld] = 0, 0, 0
        if config.ggeur.noise_std > 0:
            seed = derive_seed(config.experiment.seed, client.client_id, GGEUR_STREAM, 1)
            rng = np.random.default_rng(seed)
            noise = rng.normal(0, config.ggeur.noise_std, outers.shape)
            sums += rng.normal(0, config.ggeur.noise_std, sums.shape) * (~withheld)[:, None]
            outers += (noise + noise.transpose(0, 2, 1)) / 2 * (~withheld)[:, None, None]
        result.clients.append(ClientResult(client.client_id, {"num_examples": float(len(x))},
                                           {"stats": {"counts": counts, "sums": sums, "outers": outers}}))
    return encode_result(result)


def _train_one(res: Resident, task: Task, index: int, config: ExperimentConfig,
               global_params: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor],
               store: StateStore) -> ClientResult:
    client = task.clients[index]
    res.load_global(global_params)
    data = res.client_data(client.client_id)
    if "ggeur.values" in task.broadcast:
        data = ggeur_data(res, client.client_id, data, task.broadcast, config)
    before = global_model_report(res, data) if client.config.get("report_global") else {}
    ctx = ObjectiveContext(client.client_id, global_params, broadcast, store)
    objectives = build_objectives({**config.client.objectives, **client.config.get("objectives", {})}, ctx)
    lr = float(client.config.get("lr", config.client.lr))
    seed = derive_seed(config.experiment.seed, task.round, client.client_id)
    metrics = train_locally(res.model, data, config.client, objectives, seed, lr,
                            steps=client.config.get("local_steps"))
    metrics.update(before)
    outputs = {"model": _numpy_state(res.model)}
    for term in objectives:
        outputs.update(term.finish(res.model, int(metrics["steps"]), lr))
    return ClientResult(client.client_id, metrics, outputs)


def _train_together(res: Resident, task: Task, config: ExperimentConfig,
                    global_params: dict[str, torch.Tensor], mus: list[float]) -> list[ClientResult]:
    """Every client of the task trained in lockstep (Linear/ReLU models, SGD, FedProx's mu)."""
    names = [name for name, _ in res.model.named_parameters()]  # weight, bias of each layer
    trained = train_in_lockstep(
        [global_params[name] for name in names],
        [res.client_data(c.client_id) for c in task.clients],
        [derive_seed(config.experiment.seed, task.round, c.client_id) for c in task.clients],
        [float(c.config.get("lr", config.client.lr)) for c in task.clients],
        [c.config.get("local_steps") for c in task.clients], config.client, mus)
    return [ClientResult(c.client_id, metrics,
                         {"model": {n: p.cpu().numpy() for n, p in zip(names, params, strict=True)}})
            for c, (params, metrics) in zip(task.clients, trained, strict=True)]


def _train_each(res: Resident, task: Task, config: ExperimentConfig,
                global_params: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor],
                store: StateStore, failures: dict[int, str]) -> list[ClientResult]:
    """The task's clients trained one after another; one that raises is noted in `failures`."""
    outcomes = []
    for index, client in enumerate(task.clients):
        try:
            outcomes.append(_train_one(res, task, index, config, global_params, broadcast, store))
        except Exception as exc:  # a failing client must not take the others down
            failures[client.client_id] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    return outcomes


def run_train(content: RecordDict, host: Host = SIMULATION) -> RecordDict:
    """Train every client of a packed task (in lockstep when the model and recipe allow); a
    client that raises is reported, the rest go on."""
    task = decode_task(content)
    config = validate_config(task.experiment)
    res = host.resident(config, task)
    global_params = _tensors(task.global_arrays, res.device)
    result = WorkerResult()
    outcomes = None
    mus = lockstep_proximal_mu(config, [c.config for c in task.clients], bool(task.broadcast))
    if mus is not None:
        try:
            outcomes = _train_together(res, task, config, global_params, mus)
        except Exception:  # e.g. one client's data: retry one by one to isolate the failure
            traceback.print_exc()
    if outcomes is None:
        outcomes = _train_each(res, task, config, global_params,
                               _tensors(task.broadcast, res.device), host.state_store(task),
                               result.failures)
    for outcome in outcomes:
        if task.reduce is not None:
            for name, weighting in task.reduce.items():
                weight = outcome.metrics["num_examples"] if weighting == "examples" else 1.0
                result.sums[name] = add_weighted(result.sums.get(name), outcome.outputs[name], weight)
                result.weights[name] = result.weights.get(name, 0.0) + weight
            outcome.outputs = {}
        result.clients.append(outcome)
    return encode_result(result)


def run_evaluate(content: RecordDict, host: Host = SIMULATION) -> RecordDict:
    """Evaluate the global model on each listed client's local test split."""
    task = decode_task(content)
    config = validate_config(task.experiment)
    res = host.resident(config, task)
    res.load_global(_tensors(task.global_arrays, res.device))
    result = WorkerResult()
    for client in task.clients:
        try:
            data = res.client_data(client.client_id)
            metrics = evaluate(res.model, data.x_test, data.y_test)
            reply = {"eval_loss": metrics["loss"], "eval_accuracy": metrics["accuracy"],
                     "num_test_examples": metrics["num_examples"]}
            if data.z_test is not None:  # confusion counts per sensitive group, for fairness
                reply.update(counts_to_metrics(group_confusion(
                    data.y_test.cpu().numpy(), predict(res.model, data.x_test).cpu().numpy(),
                    data.z_test.cpu().numpy(), res.num_groups, res.num_classes)))
        except Exception as exc:
            result.failures[client.client_id] = f"{type(exc).__name__}: {exc}"
            continue
        result.clients.append(ClientResult(client.client_id, reply))
    return encode_result(result)
