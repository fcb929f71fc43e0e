"""Running one experiment end to end: check, build, train, record (a composition root)."""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsim.app import HANDLERS
from fedsim.config import ExperimentConfig
from fedsim.data.federation import build_federation
from fedsim.data.stats import label_counts
from fedsim.decomposition import LossDecomposer
from fedsim.engine.checkpoint import Checkpoint, RunCheckpoints, remove_checkpoints
from fedsim.engine.cohort import cohort_size
from fedsim.engine.inprocess import InProcessGrid, server_task_identity
from fedsim.engine.server import CentralEvaluator, ProgressCallback, RoundLog, run_rounds
from fedsim.engine.strategy import FedsimStrategy
from fedsim.engine.transports import GridTransport
from fedsim.errors import ConfigError
from fedsim.method import RunInfo
from fedsim.registry import build_add_ons, build_method, check_config, check_groups
from fedsim.results import RunWriter, default_run_dir
from fedsim.resume import resumable_checkpoint
from fedsim.tracking import check_installed
from fedsim.warmup import with_warmup_encoder


@dataclass
class RunSummary:
    """Where a run's results are, and its per-round table."""

    run_dir: Path
    rounds: pd.DataFrame
    seconds: float


def run_setup_phase(transport: GridTransport, writer: RunWriter) -> None:
    """Before round 1, the setup phase of the method and add-ons that have one (GGEUR's class
    statistics); what each reports about it goes to `setup.json`."""
    summaries, size = transport.setup()
    writer.save_json("setup.json", {"bytes_exchanged": size, **summaries})
    writer.log(f"setup phase: {', '.join(summaries)}; {size} bytes exchanged")


Start = Callable[[FedsimStrategy, Callable[[GridTransport], None]], None]


def execute(config: ExperimentConfig, evaluator: CentralEvaluator, client_sizes: np.ndarray,
            label_table: np.ndarray, start: Start, progress: ProgressCallback | None = None,
            decomposer: LossDecomposer | None = None, where: str = "",
            placement: dict | None = None, resume: Checkpoint | None = None) -> RunSummary:
    """Record the federation, build the method and the strategy around it, and run every round
    through the transport that `start(strategy, loop)` hands to `loop`; shared by simulation and
    deployment (`placement`: the strategy's placement and data_info keywords). With `resume`, the
    run continues after that checkpoint's round. However the run stops, its tables are written."""
    run_dir = default_run_dir(config)
    writer = RunWriter(run_dir, config, resume_after=resume.round if resume else None)
    if resume is None:
        writer.save_federation(label_table, f"{config.data.dataset}, {config.data.partition.kind} partition")
    run = RunInfo([name for name, _ in evaluator.model.named_parameters()], np.asarray(client_sizes),
                  config.client, config.experiment.seed, cohort_size(config, len(client_sizes)),
                  config.strategy.sampling,
                  [name for name, b in evaluator.model.named_buffers() if b.is_floating_point()])
    method, add_ons = build_method(config, run), build_add_ons(config, run)
    log = RoundLog()
    strategy = FedsimStrategy(config, method, add_ons, client_sizes, log, **(placement or {}),
                              class_groups=evaluator.class_groups)
    # deployed, the clients' state lives on their nodes, out of a checkpoint's reach: none are made
    every = 0 if placement is not None else config.output.checkpoint_every
    checkpoints = RunCheckpoints(run_dir, strategy, every, config.output.checkpoint_keep)
    if resume is not None:
        checkpoints.restore(resume)
    else:
        remove_checkpoints(run_dir)
    started = time.perf_counter()
    writer.log(f"start: {config.strategy.name} on {config.data.dataset}, "
               f"{len(client_sizes)} clients, {where or 'backend ' + config.engine.backend}")

    def loop(transport: GridTransport) -> None:
        if resume is None and any(c.has_setup_phase for c in strategy.components):
            run_setup_phase(transport, writer)
        run_rounds(config, transport, log, evaluator, writer, progress, decomposer, checkpoints, resume)

    try:
        start(strategy, loop)
    except BaseException as exc:
        writer.stop(interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    seconds = time.perf_counter() - started
    rounds = writer.finish(seconds)
    remove_checkpoints(run_dir)
    return RunSummary(run_dir, rounds, seconds)


def oversubscription(config: ExperimentConfig, cores: int) -> str:
    """A warning when local Ray workers ask for more cores than the machine has, else ''."""
    engine = config.engine
    wanted = engine.workers * engine.cpus_per_worker
    if engine.backend != "ray" or engine.ray_address or wanted <= cores:
        return ""
    return (f"engine.workers = {engine.workers} x engine.cpus_per_worker = {engine.cpus_per_worker:g} "
            f"asks for {wanted:g} cores but this machine has {cores}: the {engine.workers} worker "
            f"processes (about 0.45 GB of memory each) take turns on {cores} cores, so rounds run "
            f"slower, not faster (64 workers on 2 cores ran the quickstart 13x slower than 2); "
            f"set engine.workers = {max(1, int(cores // engine.cpus_per_worker))}")


def run_experiment(config: ExperimentConfig, progress: ProgressCallback | None = None,
                   verbose: bool = False, resume: bool = False) -> RunSummary:
    """Run `config` on its simulation backend and return the run directory and per-round metrics.
    With `resume`, a run directory (output.run_dir) that holds a checkpoint of the same experiment
    continues from it (a different experiment is refused, naming the keys that differ)."""
    check_config(config)
    check_installed(config.output)
    if warning := oversubscription(config, os.cpu_count() or 1):
        print(f"warning: {warning}", file=sys.stderr)
    if config.data.embedding == "warmup":
        config = with_warmup_encoder(config, default_run_dir(config), run_experiment)
    checkpoint = resumable_checkpoint(config) if resume else None
    if (config.engine.gpus_per_worker > 0 and not config.engine.ray_address
            and not torch.cuda.is_available()):
        raise ConfigError("engine.gpus_per_worker > 0 but no CUDA GPU is visible here; "
                          "set engine.gpus_per_worker = 0 or run on a machine with a GPU")
    federation = build_federation(config.data, config.experiment.seed)
    if config.client.augment and len(federation.input_shape) != 3:
        raise ConfigError(f"client.augment = {config.client.augment} needs images (channels, height, "
                          f"width), but {config.data.dataset}'s inputs have shape "
                          f"{tuple(federation.input_shape)}; remove client.augment")
    dataset = getattr(federation, "dataset", None)
    check_groups(config, dataset is not None and dataset.sensitive_train is not None)
    evaluator = CentralEvaluator.build(config, federation)
    decomposer = None
    if config.evaluation.decomposition:
        decomposer = LossDecomposer(copy.deepcopy(evaluator.model), federation,
                                    config.evaluation.decomposition_clients, config.experiment.seed)

    def start(strategy, loop) -> None:
        if config.engine.backend == "inprocess":
            with server_task_identity():
                grid = InProcessGrid(config.engine.workers, HANDLERS)
                loop(GridTransport(strategy, grid, config.engine.timeout))
        else:
            from fedsim.engine.ray_backend import run_on_ray

            run_on_ray(config, lambda grid: loop(GridTransport(strategy, grid, config.engine.timeout)),
                       verbose)

    return execute(config, evaluator, federation.train_sizes, label_counts(federation), start,
                   progress, decomposer, resume=checkpoint)
