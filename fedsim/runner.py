"""Running one experiment end to end: check, build, train, record (a composition root)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clients.runtime import run_evaluate, run_statistics, run_train
from fedsim.app import STATISTICS_ACTION
from fedsim.config import ExperimentConfig
from fedsim.data.federation import build_federation
from fedsim.data.stats import label_counts
from fedsim.decomposition import LossDecomposer
from fedsim.engine.server import CentralEvaluator, ProgressCallback, RoundTransport, run_rounds
from fedsim.engine.transports import GridTransport, InProcessTransport
from fedsim.errors import ConfigError
from fedsim.registry import build_strategy, check_config
from fedsim.results import RunWriter, default_run_dir
from fedsim.warmup import with_warmup_encoder
from strategies.ggeur import shapes_from_statistics


@dataclass
class RunSummary:
    """Where a run's results are, and its per-round table."""

    run_dir: Path
    rounds: pd.DataFrame
    seconds: float


def share_geometric_shapes(transport, strategy, num_clients: int, config: ExperimentConfig,
                           writer: RunWriter) -> None:
    """GGEUR's statistics phase: collect every client's class statistics once, pool them, and
    have every later training message carry the classes' geometric shapes."""
    clients, size = transport.query(STATISTICS_ACTION, list(range(num_clients)))
    statistics = {c.client_id: c.outputs["stats"] for c in clients}
    strategy.shared = shapes_from_statistics(statistics, num_clients, config.ggeur.target,
                                             config.ggeur.prototypes)
    shared_bytes = sum(a.nbytes for a in strategy.shared.values())
    writer.save_json("ggeur.json", {"clients": len(statistics), "statistics_phase_bytes": size,
                                    "shapes_bytes_per_message": shared_bytes})
    writer.log(f"ggeur: statistics of {len(statistics)} clients, {size} bytes exchanged")


Start = Callable[[object, Callable[[RoundTransport], None]], None]


def execute(config: ExperimentConfig, evaluator: CentralEvaluator, client_sizes: np.ndarray,
            label_table: np.ndarray, start: Start, progress: ProgressCallback | None = None,
            decomposer: LossDecomposer | None = None, where: str = "") -> RunSummary:
    """Record the federation, build the strategy, and run every round through the transport
    that `start(strategy, loop)` hands to `loop`; shared by simulation and deployment."""
    run_dir = default_run_dir(config)
    writer = RunWriter(run_dir, config)
    writer.save_federation(label_table, f"{config.data.dataset}, {config.data.partition.kind} partition")
    param_names = [name for name, _ in evaluator.model.named_parameters()]
    strategy = build_strategy(config, client_sizes, param_names, str(run_dir.resolve()))
    started = time.perf_counter()
    writer.log(f"start: {config.strategy.name} on {config.data.dataset}, "
               f"{len(client_sizes)} clients, {where or 'backend ' + config.engine.backend}")

    def loop(transport: RoundTransport) -> None:
        if config.ggeur.enabled:
            share_geometric_shapes(transport, strategy, len(client_sizes), config, writer)
        run_rounds(config, transport, strategy, evaluator, writer, progress, decomposer)

    start(strategy, loop)
    seconds = time.perf_counter() - started
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    writer.finish(rounds, seconds)
    return RunSummary(run_dir, rounds, seconds)


def run_experiment(config: ExperimentConfig, progress: ProgressCallback | None = None,
                   verbose: bool = False) -> RunSummary:
    """Run `config` on its simulation backend and return the run directory and per-round metrics."""
    check_config(config)
    if config.data.embedding == "warmup":
        config = with_warmup_encoder(config, default_run_dir(config), run_experiment)
    if (config.engine.gpus_per_worker > 0 and not config.engine.ray_address
            and not torch.cuda.is_available()):
        raise ConfigError("engine.gpus_per_worker > 0 but no CUDA GPU is visible here; "
                          "set engine.gpus_per_worker = 0 or run on a machine with a GPU")
    federation = build_federation(config.data, config.experiment.seed)
    evaluator = CentralEvaluator.build(config, federation)
    decomposer = None
    if config.evaluation.decomposition:
        decomposer = LossDecomposer(copy.deepcopy(evaluator.model), federation,
                                    config.evaluation.decomposition_clients, config.experiment.seed)

    def start(strategy, loop) -> None:
        if config.engine.backend == "inprocess":
            loop(InProcessTransport(strategy, config.engine.workers, run_train, run_evaluate,
                                    {STATISTICS_ACTION: run_statistics}))
        else:
            from fedsim.engine.ray_backend import run_on_ray

            run_on_ray(config, lambda grid: loop(GridTransport(strategy, grid, config.engine.timeout)),
                       verbose)

    return execute(config, evaluator, federation.train_sizes, label_counts(federation), start,
                   progress, decomposer)
