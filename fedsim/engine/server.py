"""The round loop: train, aggregate, evaluate, record; shared by every backend."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedsim.config import ExperimentConfig, RobustSection
from fedsim.data.federation import Federation
from fedsim.data.stats import label_counts
from fedsim.engine.checkpoint import Checkpoint, RunCheckpoints
from fedsim.engine.protocol import RECEIVED
from fedsim.errors import RunFailed
from fedsim.evaluation import class_group_accuracy, evaluate, long_tail_groups, predict, robust_accuracy
from fedsim.fairness.groups import group_confusion, parity_gaps
from fedsim.method import Arrays, ClientResult, RoundResult
from fedsim.models import build_model
from fedsim.results import RunWriter

ProgressCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class RoundLog:
    """The unpacked client results of the latest training and evaluation exchange, as the
    strategy reports them (its listener)."""

    train: RoundResult = field(default_factory=RoundResult)
    evaluate: RoundResult = field(default_factory=RoundResult)
    received: RoundResult = field(default_factory=RoundResult)  # the previous round's model,
    # evaluated by this round's training clients (evaluation.with_training)

    def __call__(self, kind: str, server_round: int, result: RoundResult) -> None:
        setattr(self, kind, result)


class RoundTransport(Protocol):
    """How one round's work reaches the workers and comes back (Ray grid, or in-process)."""

    def train(self, server_round: int, arrays: Arrays) -> tuple[Arrays | None, dict[str, float], int]:
        ...

    def evaluate(self, server_round: int, arrays: Arrays) -> tuple[dict[str, float], int]:
        ...


@dataclass
class CentralEvaluator:
    """Evaluates global arrays on the held-out test set, in the server process (a deployment
    without a server-side test set has none: x is None and no metrics come out)."""

    model: torch.nn.Module
    x: torch.Tensor | None
    y: torch.Tensor | None
    z: np.ndarray | None = None  # sensitive group of each test example
    num_groups: int = 0
    robust: RobustSection | None = None  # evaluation.robust: accuracy under attack
    class_groups: np.ndarray | None = None  # each class's long-tail group (evaluation.class_groups)

    @classmethod
    def build(cls, config: ExperimentConfig, federation: Federation) -> CentralEvaluator:
        model = build_model(config.model, federation.input_shape, federation.num_classes,
                            config.experiment.seed)
        x, y = federation.test_set()
        dataset = getattr(federation, "dataset", None)
        z = dataset.sensitive_test if dataset is not None else None
        groups = len(dataset.sensitive_groups) if z is not None else 0
        wanted = config.evaluation.class_groups
        if wanted is None:
            wanted = config.data.partition.imbalance > 1
        tail = long_tail_groups(label_counts(federation).sum(axis=0)) if wanted else None
        return cls(model, torch.as_tensor(x), torch.as_tensor(y), z, groups, config.evaluation.robust,
                   tail)

    def initial_arrays(self) -> Arrays:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def __call__(self, arrays: Arrays) -> dict[str, float]:
        if self.x is None:
            return {}
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
        metrics = evaluate(self.model, self.x, self.y)
        row = {"test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"]}
        if self.robust is not None and self.robust.eps:
            row.update(robust_accuracy(self.model, self.x, self.y, self.robust))
        if self.z is not None or self.class_groups is not None:
            predicted = predict(self.model, self.x).numpy()
        if self.z is not None:
            counts = group_confusion(self.y.numpy(), predicted, self.z, self.num_groups,
                                     int(self.y.max()) + 1)
            row.update({f"test_{k}": v for k, v in parity_gaps(counts).items()})
        if self.class_groups is not None:
            row.update(class_group_accuracy(predicted, self.y.numpy(), self.class_groups))
        return row


def client_rows(server_round: int, train: list[ClientResult], evaluated: list[ClientResult],
                failures: dict[int, str], skipped: dict[int, str]) -> list[dict[str, Any]]:
    """One row per client of the round: its training and/or local evaluation metrics, its error,
    or why it was skipped (dropped out, timed out)."""
    rows: dict[int, dict[str, Any]] = {}
    for result in [*train, *evaluated]:
        rows.setdefault(result.client_id, {"round": server_round, "client_id": result.client_id})
        rows[result.client_id].update(result.metrics)
    for cid, error in failures.items():
        rows.setdefault(cid, {"round": server_round, "client_id": cid})["error"] = error
    for cid, reason in skipped.items():
        rows.setdefault(cid, {"round": server_round, "client_id": cid})["skipped"] = reason
    return [rows[cid] for cid in sorted(rows)]


def is_finite(arrays: Arrays) -> bool:
    """Whether every float array holds only finite values."""
    return all(np.isfinite(a).all() for a in arrays.values() if np.issubdtype(a.dtype, np.floating))


def run_rounds(config: ExperimentConfig, transport: RoundTransport, log: RoundLog,
               evaluator: CentralEvaluator, writer: RunWriter,
               progress: ProgressCallback | None = None,
               decomposer: Callable[[int, list[ClientResult], Arrays], dict[str, float]] | None = None,
               checkpoints: RunCheckpoints | None = None, resume: Checkpoint | None = None) -> Arrays:
    """Run every round, writing each one's results as soon as it is done; returns final arrays.

    `decomposer`, when given, adds the loss decomposition of the round's aggregate to the rows of
    central-evaluation rounds. A non-finite aggregate or training loss stops the run (or, with
    engine.on_divergence = "keep", is dropped); engine.max_failed_rounds consecutive rounds in
    which clients failed and none succeeded stop it too. Either way the rounds so far stay on
    disk and RunFailed says why.

    `checkpoints` saves the run's state after the rounds it says are due; `resume` continues
    from a checkpoint (whose server and client state the strategy already holds)."""
    rounds, every = config.experiment.rounds, config.evaluation.every
    failed_streak: list[tuple[int, int, str]] = []  # (round, client, error) of each failed round
    noted: set[str] = set()  # workers' notes already in the log
    if resume is None:
        arrays = evaluator.initial_arrays()
        writer.add_round({"round": 0, **evaluator(arrays)}, [])
    else:
        arrays = resume.arrays
        failed_streak = [tuple(entry) for entry in resume.engine["failed_streak"]]
        writer.log(f"resumed after round {resume.round} from its checkpoint")
    for rnd in range((resume.round if resume else 0) + 1, rounds + 1):
        started = time.perf_counter()
        new, row, sent = transport.train(rnd, arrays)
        row["train_seconds"] = time.perf_counter() - started
        received = {k.removeprefix(RECEIVED): row.pop(k) for k in list(row) if k.startswith(RECEIVED)}
        if received:  # completes the previous round's row
            writer.add_round({"round": rnd - 1, **received},
                             client_rows(rnd - 1, [], log.received.clients, {}, {}))
        loss_ok = np.isfinite(row["train_loss"]) or row["num_clients"] == 0  # (a noise-only round)
        diverged = new is not None and not (is_finite(new) and loss_ok)
        if diverged:
            row["diverged"] = 1.0
            writer.log(f"round {rnd}: diverged (train_loss {row['train_loss']}); global model unchanged")
        elif new is not None:
            arrays = new
            if decomposer is not None and (rnd % every == 0 or rnd == rounds):
                row.update(decomposer(rnd, log.train.clients, arrays))
        else:
            writer.log(f"round {rnd}: no client succeeded; global model unchanged")
        evaluated, eval_sent = [], 0
        ev = config.evaluation
        if ev.client_fraction > 0 and (rnd == rounds or (rnd % ev.client_every == 0
                                                         and not ev.with_training)):
            eval_row, eval_sent = transport.evaluate(rnd, arrays)
            row.update(eval_row)
            evaluated = log.evaluate.clients
        if rnd % every == 0 or rnd == rounds:
            row.update(evaluator(arrays))
        row.update({"round": rnd, "seconds": time.perf_counter() - started,
                    "bytes_exchanged": float(sent + eval_sent)})
        for note in log.train.notes:
            if note not in noted:  # once per run
                noted.add(note)
                writer.log(f"round {rnd}: {note}")
        failures = {**log.train.failures}
        for cid, error in failures.items():
            writer.log(f"round {rnd}: client {cid} failed: {error}")
        writer.add_round(row, client_rows(rnd, log.train.clients, evaluated, failures,
                                          log.train.skipped))
        if progress is not None:
            progress(rnd, row)
        if diverged and config.engine.on_divergence == "stop":
            raise RunFailed(f"diverged at round {rnd}: the global model or the training loss "
                            f"(train_loss = {row['train_loss']}) is not finite; lower client.lr, "
                            f"or set engine.on_divergence = 'keep'; rounds 0-{rnd} are in {writer.run_dir}")
        failed_streak = [*failed_streak, (rnd, *next(iter(failures.items())))] if (
            failures and not log.train.clients) else []
        if len(failed_streak) >= config.engine.max_failed_rounds:
            first, cid, error = failed_streak[0]
            raise RunFailed(f"no client succeeded in {len(failed_streak)} consecutive rounds "
                            f"({first}-{rnd}, engine.max_failed_rounds); the first error, client "
                            f"{cid} in round {first}: {error}; rounds 0-{rnd} are in {writer.run_dir}")
        if checkpoints is not None and rnd < rounds and checkpoints.due(rnd, row["seconds"]):
            checkpoints.save(rnd, arrays, {"failed_streak": failed_streak})
    if len(failed_streak) == rounds:  # a run shorter than max_failed_rounds, every round failed
        _, cid, error = failed_streak[0]
        raise RunFailed(f"no client succeeded in any of the {rounds} rounds; the first error, client "
                        f"{cid} in round 1: {error}; the rounds are in {writer.run_dir}")
    if config.output.save_model:
        writer.save_model(arrays)
    return arrays
