"""Seconds per round of one experiment simulated and deployed on loopback, side by side.

  simulation         `fedsim run` with the in-process backend (the same clients, one process)
  deployed, 2 msgs   `fedsim deploy local`: a SuperLink and one SuperNode per client, with TLS and
                     node authentication; Flower starts a new ClientApp process for every message,
                     and each round sends two (training, then local evaluation)
  deployed, 1 msg    the same with evaluation.with_training: the training message brings back the
                     local evaluation of the model it carried
  deployed, SecAgg+  1 msg with deployment.secure_aggregation: each training round is SecAgg+'s four
                     messages per node

All run the quickstart experiment with N clients (all train every round, local evaluation every
round). First it times what a deployed message's new process imports (Flower's ClientApp
runtime, torch, then fedsim's ClientApp). The last line printed is JSON with the ratios and the
final models' largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "quickstart.toml"


IMPORTS = """
import json, time
start = time.perf_counter()
import flwr.supernode.cli
flower = time.perf_counter()
import torch
torch_done = time.perf_counter()
import fedsim.deploy.clientapp
print(json.dumps([flower - start, torch_done - flower, time.perf_counter() - torch_done]))
"""


def import_seconds(repeats: int = 3) -> list[float]:
    """Seconds a fresh process spends importing Flower's ClientApp runtime, torch and fedsim's
    ClientApp (the median of `repeats` processes, one at a time)."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(repeats)]
    return [sorted(column)[len(column) // 2] for column in zip(*runs, strict=True)]


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

    flower, torch_seconds, fedsim_seconds = import_seconds()
    print(f"a message's process imports: Flower {flower:.2f} s, torch {torch_seconds:.2f} s, "
          f"fedsim's ClientApp {fedsim_seconds:.2f} s")
    out = Path(tempfile.mkdtemp(prefix="fedsim-deploy-bench-"))
    common = [f"data.num_clients={args.nodes}", f"strategy.clients_per_round={args.nodes}",
              f"experiment.rounds={args.rounds}"]
    simulated = run_experiment(load_config(EXPERIMENT, [*common, "engine.backend=inprocess",
                                                        f"output.dir={out / 'sim'}"])).run_dir
    runs = {"simulation": simulated,
            "deployed, 2 msgs": run_local(EXPERIMENT, [*common, f"output.dir={out / 'two'}"]),
            "deployed, 1 msg": run_local(EXPERIMENT, [*common, f"output.dir={out / 'one'}",
                                                      "evaluation.with_training=true"]),
            "deployed, SecAgg+": run_local(EXPERIMENT, [*common, f"output.dir={out / 'secure'}",
                                                        "evaluation.with_training=true",
                                                        "deployment.secure_aggregation=true"])}
    print(f"{'way':18s} {'s/round':>8s} {'train s':>8s} {'final acc':>9s} {'client acc':>10s}")
    seconds = {}
    for way, run_dir in runs.items():
        rounds = pd.read_parquet(run_dir / "rounds.parquet")
        later = rounds[rounds["round"] > 1]  # the first round includes starting up
        seconds[way] = float(later["seconds"].median())
        print(f"{way:18s} {seconds[way]:8.3f} {later['train_seconds'].median():8.3f} "
              f"{rounds['test_accuracy'].iloc[-1]:9.4f} {rounds['client_eval_accuracy'].iloc[-1]:10.4f}")
    gaps = {}
    for way in ("deployed, 2 msgs", "deployed, 1 msg", "deployed, SecAgg+"):
        with np.load(simulated / "model.npz") as a, np.load(runs[way] / "model.npz") as b:
            gaps[way] = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    two, one = seconds["deployed, 2 msgs"], seconds["deployed, 1 msg"]
    secure = seconds["deployed, SecAgg+"]
    print(f"deployed / simulated: {two / seconds['simulation']:.1f} (2 msgs), "
          f"{one / seconds['simulation']:.1f} (1 msg); 1 msg / 2 msgs = {one / two:.2f}; "
          f"SecAgg+ / 1 msg = {secure / one:.2f}; largest weight difference from the simulation "
          f"{gaps['deployed, 2 msgs']:.2e} (2 msgs), {gaps['deployed, 1 msg']:.2e} (1 msg), "
          f"{gaps['deployed, SecAgg+']:.2e} (SecAgg+)")
    print(json.dumps({"two_messages_over_simulation": round(two / seconds["simulation"], 1),
                      "one_message_over_two": round(one / two, 2), "secure_over_one": round(secure / one, 2),
                      "max_weight_gap": max(gaps[w] for w in ("deployed, 2 msgs", "deployed, 1 msg")),
                      "secure_weight_gap": gaps["deployed, SecAgg+"]}))


if __name__ == "__main__":
    main()
