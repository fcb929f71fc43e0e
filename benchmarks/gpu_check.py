"""GPU check: one experiment on CPU and on the GPU, in-process and on Ray, side by side.

For each (backend, device) it runs the same spec in a fresh subprocess and reports seconds per
round, final test accuracy, whether the clients' models lived on CUDA, and the largest absolute
difference between the final GPU model and the final CPU model of the same backend (GPU kernels
are not bit-identical to CPU ones, so expect small float differences, not zero).
The last line printed is JSON with those numbers. Needs a CUDA GPU; extra `--set` overrides
change the workload (default: the quickstart with the small CNN, 10 rounds).

`--vectorize` instead times local training with the clients vectorized (engine.vectorize = on,
lockstep off)
against one by one, in-process on one worker, for the throughput benchmark's `cnn` and `mlp-prox`
workloads and a `resnet` one (BatchNorm: it falls back to one by one, and says so), 1000 clients
and a cohort of 100; `--device cpu` runs the same table on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ["model.name=cnn", "experiment.rounds=10", "output.save_model=true"]
WAYS = {("inprocess", "cpu"): ["engine.backend=inprocess", "engine.gpus_per_worker=0"],
        ("inprocess", "gpu"): ["engine.backend=inprocess", "engine.gpus_per_worker=0.5"],
        ("ray", "cpu"): ["engine.backend=ray", "engine.gpus_per_worker=0"],
        ("ray", "gpu"): ["engine.backend=ray", "engine.gpus_per_worker=0.5"]}


def child(overrides: list[str]) -> None:
    """Run one experiment here; print seconds per round, accuracy and the clients' device."""
    import torch

    import clients.runtime as runtime
    from fedsim.config import load_config
    from fedsim.runner import run_experiment

    config = load_config(ROOT / "experiments" / "quickstart.toml", overrides)
    summary = run_experiment(config)
    rounds = summary.rounds
    # In-process runs keep the resident model in this process; Ray workers report via their log.
    devices = sorted({str(r.device) for r in runtime._RESIDENT.values()})
    print(json.dumps({"s_per_round": float(np.median(rounds["train_seconds"].dropna())),
                      "accuracy": float(rounds["test_accuracy"].iloc[-1]),
                      "client_devices": devices, "cuda": torch.cuda.is_available(),
                      "run_dir": str(summary.run_dir)}))


def measure(overrides: list[str], timeout: float) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--", *overrides], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
                "stderr": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_difference(a: str, b: str) -> float:
    with np.load(Path(a) / "model.npz") as x, np.load(Path(b) / "model.npz") as y:
        return max(float(np.max(np.abs(x[k] - y[k]))) for k in x.files)


def vectorize_table(device: str, timeout: float, extra: list[str]) -> dict:
    """Seconds of local training per round, vectorized vs one by one, per workload."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import WORKLOADS

    workloads = {name: WORKLOADS[name] for name in ("cnn", "mlp-prox", "resnet")}
    common = ["engine.backend=inprocess", "engine.workers=1", "engine.lockstep=false",
              "data.num_clients=1000", "strategy.clients_per_round=100",
              "experiment.rounds=3", "evaluation.every=3", "evaluation.client_fraction=0",
              "client.local_epochs=1", f"engine.gpus_per_worker={1 if device == 'gpu' else 0}"]
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedsim-vectorize-{os.getpid()}"
    table: dict[str, dict] = {}
    print(f"{'workload':9s} {'one by one':>11s} {'vectorized':>11s} {'ratio':>6s}  ({device})")
    for name, spec in workloads.items():
        row = {}
        for mode in ("off", "on"):
            run = [*spec, *common, *extra, f"engine.vectorize={mode}",
                   f"output.run_dir='{out_dir / f'{name}-{mode}'}'"]
            row[mode] = measure(run, timeout)
        if any("error" in r for r in row.values()):
            print(f"{name:9s} failed: {[r.get('error') for r in row.values()]}")
            table[name] = {m: r.get("error") for m, r in row.items()}
            continue
        one, vec = row["off"]["s_per_round"], row["on"]["s_per_round"]
        fallback = "one by one" in (out_dir / f"{name}-on" / "log.txt").read_text()
        table[name] = {"one_by_one_s": one, "vectorized_s": vec, "ratio": vec / one,
                       "fell_back": fallback}
        print(f"{name:9s} {one:11.3f} {vec:11.3f} {vec / one:6.2f}" + ("  (fell back)" if fallback else ""))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="extra override key=value")
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed per run")
    parser.add_argument("--vectorize", action="store_true", help="vectorized vs one-by-one table")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="for --vectorize")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child([a for a in rest if a != "--"])
        return
    if args.vectorize:
        print(json.dumps(vectorize_table(args.device, args.timeout, args.set)))
        return
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedsim-gpu-{os.getpid()}"
    results: dict[str, dict] = {}
    print(f"{'backend':10s} {'device':6s} {'s/round':>8s} {'accuracy':>9s}  clients on")
    for (backend, device), way in WAYS.items():
        spec = [*WORKLOAD, *args.set, *way, f"output.run_dir='{out_dir / f'{backend}-{device}'}'"]
        r = results[f"{backend}-{device}"] = measure(spec, args.timeout)
        if "error" in r:
            print(f"{backend:10s} {device:6s} failed: {r['error']}")
            print(r.get("stderr", ""), file=sys.stderr)
            continue
        print(f"{backend:10s} {device:6s} {r['s_per_round']:8.3f} {r['accuracy']:9.4f}  "
              f"{','.join(r['client_devices']) or '(worker processes)'}")
    for backend in ("inprocess", "ray"):
        cpu, gpu = results[f"{backend}-cpu"], results[f"{backend}-gpu"]
        if "run_dir" in cpu and "run_dir" in gpu:
            gpu["max_abs_diff_vs_cpu"] = model_difference(cpu["run_dir"], gpu["run_dir"])
            print(f"{backend}: max |GPU model - CPU model| = {gpu['max_abs_diff_vs_cpu']:.2e}")
    print(json.dumps({k: {m: v for m, v in r.items() if m not in ("stderr", "run_dir")}
                      for k, r in results.items()}))


if __name__ == "__main__":
    main()
