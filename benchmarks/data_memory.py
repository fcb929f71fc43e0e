"""Memory of a run whose dataset is memory-mapped (data.memory_map = true, the default) or decoded
by every process (false), side by side.

Each case is `fedsim run` in a fresh process on Ray with 2 workers: the driver and both workers
hold the dataset. Its process tree is sampled every 0.2 s; the table shows the peaks of the summed
RSS and of the summed PSS (which counts a shared page once in all) and the ratios. The array cache
is filled before the mapped case, as any earlier run or process of the same data fills it.

    python benchmarks/data_memory.py [--dataset fashion-mnist] [--rounds 3]

The last line printed is JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import PeakMemory

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def overrides(dataset: str, rounds: int, mapped: bool, out: Path) -> list[str]:
    keys = [f"data.dataset={dataset}", "data.num_clients=20", f"experiment.rounds={rounds}",
            "model.name=mlp", "engine.workers=2", "evaluation.client_fraction=0",
            f"data.memory_map={str(mapped).lower()}", f"output.dir={out}", "output.save_model=false"]
    return [part for key in keys for part in ("--set", key)]


def measure(dataset: str, rounds: int, mapped: bool, env: dict[str, str], out: Path) -> dict[str, float]:
    """Peak summed RSS and PSS (MB) of one run's process tree, and its wall time."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.toml",
                                *overrides(dataset, rounds, mapped, out)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    memory = PeakMemory(process.pid, kinds=("rss", "pss"))
    memory.start()
    _, stderr = process.communicate()
    memory.done.set()
    if process.returncode != 0:
        raise SystemExit(f"fedsim run failed:\n{stderr.decode()[-3000:]}")
    return {"rss_mb": memory.peaks["rss"] / 2**20, "pss_mb": memory.peaks["pss"] / 2**20,
            "seconds": time.perf_counter() - started}


def fill_cache(dataset: str, env: dict[str, str]) -> None:
    code = ("from fedsim.config import load_config; from fedsim.data.sources import load_source; "
            f"load_source(load_config(None, ['data.dataset={dataset}']).data, 0)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **QUIET, "FEDSIM_CACHE_DIR": str(Path(tmp) / "cache")}
        decoded = measure(args.dataset, args.rounds, False, env, Path(tmp) / "runs")
        fill_cache(args.dataset, env)
        mapped = measure(args.dataset, args.rounds, True, env, Path(tmp) / "runs")
    print(f"{args.dataset}, Ray with 2 workers, {args.rounds} rounds: peak memory of the run's process tree")
    print(f"{'':>28} {'RSS summed (MB)':>16} {'PSS summed (MB)':>16} {'seconds':>8}")
    for name, row in (("each process decodes", decoded), ("memory-mapped (default)", mapped)):
        print(f"{name:>28} {row['rss_mb']:16.0f} {row['pss_mb']:16.0f} {row['seconds']:8.1f}")
    ratios = {k: mapped[k] / decoded[k] for k in ("rss_mb", "pss_mb", "seconds")}
    print(f"{'mapped / decoded':>28} {ratios['rss_mb']:16.2f} {ratios['pss_mb']:16.2f} "
          f"{ratios['seconds']:8.2f}")
    print(json.dumps({"dataset": args.dataset, "decoded": decoded, "mapped": mapped, "ratios": ratios}))


if __name__ == "__main__":
    main()
