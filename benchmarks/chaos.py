"""Chaos test: runs that are killed and resumed end as if nothing had happened.

Three 50-round runs of the quickstart experiment on Ray (2 workers), side by side:

  undisturbed     `fedsim run`, start to finish
  run killed      the whole `fedsim run` process group SIGKILLed at 3 random moments, each time
                  continued with `fedsim run --resume`
  + worker kills  the same, and a random Ray worker process SIGKILLed about every 5 rounds

It prints the wall time (and its ratio to the undisturbed run), the rounds run twice because
they came after the last checkpoint at a kill ("rounds lost"), the rounds in which clients
failed, the final accuracy, and whether the final model and rounds table equal the undisturbed
run's bit for bit (wall-clock columns aside). A killed worker's clients fail for that round, so
the last row cannot equal the undisturbed run; the one before must. Linux only (reads /proc).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "quickstart.toml"
WALL_CLOCK = ["seconds", "train_seconds"]


def rounds_written(run_dir: Path) -> int:
    """Rounds in the journal (round 0 aside), or in the table of a finished run."""
    from fedsim.results import read_table

    try:
        table = read_table(run_dir, "rounds")
    except (OSError, ValueError):
        return 0
    return int(table["round"].max()) if len(table) else 0


def ray_workers() -> list[int]:
    """PIDs of this machine's Ray worker processes (Flower's ClientApp actors)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ClientAppActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_with_chaos(run_dir: Path, overrides: list[str], kill_at: list[int], worker_every: float,
                   rng: random.Random) -> dict:
    """Run to the end, SIGKILLing the run when it passes each round in `kill_at` (and a random
    worker about every `worker_every` rounds, if > 0); returns what it cost."""
    from fedsim.engine.checkpoint import saved_rounds

    sets = [a for o in [*overrides, f"output.run_dir={run_dir}"] for a in ("--set", o)]
    started = time.perf_counter()
    process = start([str(EXPERIMENT), *sets])
    pending, lost, worker_kills = list(kill_at), 0, 0
    next_worker = rng.uniform(0.5, 1.5) * worker_every if worker_every > 0 else float("inf")
    while True:
        if process.poll() is not None:
            if process.returncode != 0:
                raise RuntimeError(f"fedsim run failed: {process.stderr.read().decode()[-2000:]}")
            break
        done = rounds_written(run_dir)
        if pending and done >= pending[0]:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pending.pop(0)
            checkpoints = saved_rounds(run_dir)
            lost += rounds_written(run_dir) - (checkpoints[-1] if checkpoints else 0)
            process = start(["--resume", str(run_dir)])
        elif done >= next_worker and (workers := ray_workers()):
            os.kill(rng.choice(workers), signal.SIGKILL)
            worker_kills += 1
            next_worker = done + rng.uniform(0.5, 1.5) * worker_every
        time.sleep(0.02)
    return {"seconds": time.perf_counter() - started, "run_kills": len(kill_at),
            "worker_kills": worker_kills, "rounds_lost": lost}


def same_run(a: Path, b: Path) -> bool:
    with np.load(a / "model.npz") as first, np.load(b / "model.npz") as second:
        model = all(np.array_equal(first[k], second[k]) for k in first.files)
    left, right = (pd.read_parquet(d / "rounds.parquet").drop(columns=WALL_CLOCK) for d in (a, b))
    return model and left.equals(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--kills", type=int, default=3, help="times the whole run is SIGKILLed")
    parser.add_argument("--worker-every", type=float, default=5.0, help="rounds between worker kills")
    parser.add_argument("--seed", type=int, default=0, help="seeds the moments of the kills")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra experiment override, e.g. output.checkpoint_every=5")
    args = parser.parse_args()
    from fedsim.engine.ray_backend import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    rng = random.Random(args.seed)
    overrides = [f"experiment.rounds={args.rounds}", "engine.backend=ray", *args.overrides]
    out = Path(tempfile.mkdtemp(prefix="fedsim-chaos-"))
    runs = {"undisturbed": run_with_chaos(out / "a", overrides, [], 0, rng)}
    kill_at = sorted(rng.sample(range(2, args.rounds - 1), args.kills))
    runs["run killed"] = run_with_chaos(out / "b", overrides, kill_at, 0, rng)
    runs["+ worker kills"] = run_with_chaos(out / "c", overrides, kill_at, args.worker_every, rng)
    base = runs["undisturbed"]["seconds"]
    header = (f"{'run':16s} {'seconds':>8s} {'x undisturbed':>14s} {'run kills':>9s} {'worker kills':>12s} "
              f"{'rounds lost':>11s} {'failed rounds':>13s} {'final acc':>9s} {'same as undisturbed':>19s}")
    print(f"{args.rounds} rounds of the quickstart on Ray; run killed after rounds {kill_at}")
    print(header)
    for name, folder in zip(runs, ("a", "b", "c"), strict=True):
        rounds = pd.read_parquet(out / folder / "rounds.parquet")
        runs[name].update({
            "ratio": runs[name]["seconds"] / base,
            "failed_rounds": int((rounds["num_failures"] > 0).sum()),
            "final_accuracy": float(rounds["test_accuracy"].dropna().iloc[-1]),
            "same_as_undisturbed": same_run(out / "a", out / folder)})
        r = runs[name]
        print(f"{name:16s} {r['seconds']:8.1f} {r['ratio']:14.2f} {r['run_kills']:9d} "
              f"{r['worker_kills']:12d} {r['rounds_lost']:11d} {r['failed_rounds']:13d} "
              f"{r['final_accuracy']:9.4f} {str(r['same_as_undisturbed']):>19s}")
    print(json.dumps({"rounds": args.rounds, "kill_after_rounds": kill_at, "runs": runs}))


if __name__ == "__main__":
    main()
