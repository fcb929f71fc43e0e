"""Seconds per round of one experiment simulated and deployed on loopback, side by side.

  simulation  `fedsim run` with the in-process backend (the same clients, one process)
  deployment  `fedsim deploy local`: a SuperLink and one SuperNode per client, with TLS and node
              authentication; Flower starts a new ClientApp process for every message

Both run the quickstart experiment with N clients (all train every round, local evaluation every
round). The last line printed is JSON with the ratio and the final models' largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "quickstart.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from fedsim.engine.ray_backend import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from fedsim.config import load_config
    from fedsim.deploy.local import run_local
    from fedsim.runner import run_experiment

    out = Path(tempfile.mkdtemp(prefix="fedsim-deploy-bench-"))
    common = [f"data.num_clients={args.nodes}", f"strategy.clients_per_round={args.nodes}",
              f"experiment.rounds={args.rounds}"]
    simulated = run_experiment(load_config(EXPERIMENT, [*common, "engine.backend=inprocess",
                                                        f"output.dir={out / 'sim'}"])).run_dir
    deployed = run_local(EXPERIMENT, [*common, f"output.dir={out / 'deploy'}"])
    print(f"{'way':12s} {'s/round':>8s} {'train s':>8s} {'final acc':>9s}")
    seconds = {}
    for way, run_dir in (("simulation", simulated), ("deployment", deployed)):
        rounds = pd.read_parquet(run_dir / "rounds.parquet").dropna(subset=["seconds"])
        later = rounds[rounds["round"] > 1]  # the first round includes starting up
        seconds[way] = float(later["seconds"].median())
        print(f"{way:12s} {seconds[way]:8.3f} {later['train_seconds'].median():8.3f} "
              f"{rounds['test_accuracy'].iloc[-1]:9.4f}")
    with np.load(simulated / "model.npz") as a, np.load(deployed / "model.npz") as b:
        gap = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    ratio = seconds["deployment"] / seconds["simulation"]
    print(f"deployment / simulation = {ratio:.1f}; largest weight difference {gap:.2e}")
    print(json.dumps({"deployment_over_simulation": round(ratio, 1), "max_weight_gap": gap}))


if __name__ == "__main__":
    main()
