"""Running the round loop on Flower's simulation engine with the Ray backend.

W worker SuperNodes run the ClientApp; each message packs several virtual clients.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ExperimentConfig
from fedsim.engine.transports import wait_for_nodes

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def backend_config(config: ExperimentConfig, verbose: bool) -> dict:
    engine = config.engine
    init_args: dict = {"include_dashboard": False, "log_to_driver": verbose,
                       "logging_level": logging.INFO if verbose else logging.ERROR}
    if engine.ray_address:
        init_args["address"] = engine.ray_address
    else:  # "local": never attach to a cluster someone started with `ray start` on this machine
        init_args["address"] = "local"
        init_args["num_cpus"] = max(1, round(engine.workers * engine.cpus_per_worker))
    # max_restarts (passed on to Ray's actor options): a worker process that dies is restarted;
    # the clients it was training that round fail, the next rounds have all the workers again
    return {"client_resources": {"num_cpus": engine.cpus_per_worker,
                                 "num_gpus": engine.gpus_per_worker, "max_restarts": -1},
            "init_args": init_args}


def run_on_ray(config: ExperimentConfig, loop: Callable[[Grid], None], verbose: bool = False) -> None:
    """Start Ray and W worker nodes, run `loop(grid)` as the ServerApp, then stop everything."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation  # after the environment is set

    from fedsim.app import client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        wait_for_nodes(grid, config.engine.workers)
        loop(grid)

    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=config.engine.workers,
                   backend_config=backend_config(config, verbose), verbose_logging=verbose)
