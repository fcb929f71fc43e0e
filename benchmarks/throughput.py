"""Seconds per round of one FedAvg workload, three ways, side by side.

  raw     a plain sequential PyTorch FedAvg loop in one process (the faster of 1 and 2 threads)
  fedsim  fedsim on Flower + Ray: W = 2 workers, many virtual clients per message (logistic
          regression and MLP clients train in lockstep; `fedsim 1by1` shows them trained one
          by one)
  flower  one Flower node per client with Flower's own FedAvg (how Flower is usually used)

Workloads: `cnn` (Fashion-MNIST, 1000 clients x 60 examples, cohort 50, small CNN, batch 10,
lr 0.1), `mlp-prox` (the same data, FedProx mu 0.1 with Adam on an MLP 128), `resnet` (the
same data over 200 clients, cohort 20, the small ResNet with BatchNorm, lr 0.05) and `tiny`
(Synthetic(1,1), 1000 clients, cohort 100, logistic regression, batch 10). `tiny-capped` is
`tiny` with at most 60 examples per client, where orchestration dominates. Workloads other than
logistic regression also show `fedsim vmap` (engine.vectorize = on, lockstep off: the clients of
a worker as one torch.func program; on CPU the default trains them one by one).
`flower` runs Flower's FedAvg, so FedAvg workloads only (`--skip-flower` leaves it out).
Then the scale check: fedsim on `tiny` with 1,000 vs 100,000 clients at the same cohort.
Each measurement runs in a fresh subprocess; peak memory is the RSS summed over its process tree.
The last line printed is JSON with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from memory import PeakMemory

from clients.lockstep import LOCKSTEP_MODELS

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "cnn": ["data.dataset=fashion-mnist", "data.num_clients=1000", "data.partition.kind=iid",
            "data.client_test_fraction=0", "data.partition.min_size=1", "model.name=cnn",
            "strategy.clients_per_round=50", "client.batch_size=10", "client.lr=0.1"],
    "tiny": ["data.dataset=synthetic", "data.partition.kind=natural", "data.num_clients=1000",
             "data.synthetic.alpha=1", "data.synthetic.beta=1", "model.name=logreg",
             "strategy.clients_per_round=100", "client.batch_size=10", "client.lr=0.01"],
}
WORKLOADS["mlp-prox"] = [*WORKLOADS["cnn"][:5], "model.name=mlp", "model.hidden=[128]",
                         "strategy.name=fedprox", "strategy.mu=0.1", "client.optimizer=adam",
                         "strategy.clients_per_round=50", "client.batch_size=10", "client.lr=0.001"]
WORKLOADS["resnet"] = [*WORKLOADS["cnn"][:5], "data.num_clients=200", "model.name=resnet",
                       "strategy.clients_per_round=20", "client.batch_size=10", "client.lr=0.05"]
# `tiny` with client sizes capped at 60: FedProx's log-normal sizes average about 450 examples,
# which makes `tiny` compute-bound; capped, orchestration is most of a round.
WORKLOADS["tiny-capped"] = [*WORKLOADS["tiny"], "data.synthetic.max_client_size=60"]
COMMON = ["client.local_epochs=1", "evaluation.client_fraction=0", "engine.workers=2",
          "output.save_model=false"]


def load(overrides: list[str]):
    from fedsim.config import load_config

    return load_config(None, overrides)


def raw_loop(config, threads: int) -> list[float]:
    """Sequential FedAvg (FedProx: with its proximal term): every client trains the one model in
    turn; weighted mean per round."""
    import torch

    from clients.training import train_locally
    from fedsim.data.federation import build_federation
    from fedsim.data.tensors import LocalData
    from fedsim.engine.cohort import CohortSampler
    from fedsim.method import ClientContext, TrainPlan
    from fedsim.models import build_model
    from fedsim.seeding import derive_seed
    from fedsim.terms import Proximal

    torch.set_num_threads(threads)
    fed = build_federation(config.data, config.experiment.seed)
    model = build_model(config.model, fed.input_shape, fed.num_classes, config.experiment.seed)
    sampler = CohortSampler(config, fed.train_sizes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for rnd in range(1, config.experiment.rounds + 1):
        start = time.perf_counter()
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        weight = 0.0
        for cid in sampler.sample_cohort(rnd):
            model.load_state_dict(global_state)
            d = fed.client_data(cid)
            terms = []
            if config.strategy.name == "fedprox":  # FedProx's proximal term, as a raw loop adds it
                ctx = ClientContext(cid, rnd, TrainPlan(), global_state, {}, None, config.client,
                                    config.client.lr)
                terms = [Proximal(Proximal.Params(mu=config.strategy.params["mu"]), ctx)]
            train_locally(model, LocalData.from_arrays(d), config.client, terms,
                          derive_seed(0, rnd, cid), config.client.lr)
            n = float(len(d.y_train))
            for k, v in model.state_dict().items():
                total[k] += n * v.double()
            weight += n
        global_state = {k: (v / weight).to(global_state[k].dtype) for k, v in total.items()}
        times.append(time.perf_counter() - start)
    return times


def fedsim_run(config) -> list[float]:
    from fedsim.runner import run_experiment

    summary = run_experiment(config)
    return summary.rounds["train_seconds"].dropna().tolist()  # rounds 1..R, evaluation excluded


def flower_run(config) -> list[float]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from flower_per_client import run

    from fedsim.data.federation import build_federation
    from fedsim.models import build_model

    fed = build_federation(config.data, config.experiment.seed)
    model = build_model(config.model, fed.input_shape, fed.num_classes, config.experiment.seed)
    return run(config, {k: torch.as_tensor(v) for k, v in model.state_dict().items()})


def child(mode: str, overrides: list[str]) -> None:
    """Run one measurement in this process and print its JSON result."""
    config = load(overrides)
    memory = PeakMemory()
    memory.start()
    if mode.startswith("raw"):
        times = raw_loop(config, threads=int(mode[-1]))
    elif mode == "fedsim":
        times = fedsim_run(config)
    else:
        times = flower_run(config)
    memory.done.set()
    memory.sample()
    later = times[1:] if len(times) > 1 else times
    print(json.dumps({"median": float(np.median(later)), "first": times[0], "peak_mb": memory.peak / 2**20}))


def measure(mode: str, overrides: list[str]) -> dict:
    from fedsim.engine.ray_backend import QUIET_ENV

    env = {**os.environ, **QUIET_ENV}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--", *overrides],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def population_check(rounds: int, out_dir: Path) -> dict:
    """Seconds per round and peak memory of the whole run as the population grows at a fixed
    cohort: Synthetic (`tiny`, clients capped at 200 examples) with 1k, 100k and 1M clients, and
    Fashion-MNIST (an indexed dataset, IID) split over 1k and 50k clients (its 60,000 training
    examples cannot give 100k clients one example each)."""
    synthetic = [*WORKLOADS["tiny"], "data.synthetic.max_client_size=200"]
    indexed = [*WORKLOADS["cnn"][:5], "model.name=logreg",
               "strategy.clients_per_round=100", "client.batch_size=10", "client.lr=0.01"]
    cases = {("synthetic", n): synthetic + [f"data.num_clients={n}"] for n in (1_000, 100_000, 1_000_000)}
    cases.update({("fashion-mnist", n): indexed + [f"data.num_clients={n}"] for n in (1_000, 50_000)})
    print(f"{'data':14s} {'clients':>9s} {'s/round':>9s} {'x 1k':>6s} {'first':>7s} {'peak MB':>8s}")
    found: dict = {}
    for (data, clients), spec in cases.items():
        run = [*spec, *COMMON, f"experiment.rounds={rounds}", f"evaluation.every={rounds}",
               f"output.run_dir='{out_dir / f'{data}-{clients}'}'"]
        r = measure("fedsim", run)
        base = found.get(f"{data}-1000", r)["median"]
        found[f"{data}-{clients}"] = {**r, "over_1k": r["median"] / base}
        print(f"{data:14s} {clients:9d} {r['median']:9.3f} {r['median'] / base:6.2f} {r['first']:7.1f} "
              f"{r['peak_mb']:8.0f}")
    return {k: {m: round(v, 3) for m, v in r.items()} for k, r in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--no-scale", action="store_true", help="skip the population scale check")
    parser.add_argument("--skip-flower", action="store_true", help="skip one-Flower-node-per-client")
    parser.add_argument("--population", action="store_true",
                        help="only the population check: 1k / 100k / 1M Synthetic clients, and "
                             "Fashion-MNIST split over 1k / 50k clients")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, [a for a in rest if a != "--"])
        return
    rounds = 4 if args.quick else 10
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedsim-bench-{os.getpid()}"
    if args.population:
        print(json.dumps(population_check(rounds, out_dir)))
        return
    summary: dict[str, dict[str, float]] = {}
    print(f"{'workload':11s} {'way':12s} {'s/round':>9s} {'first':>7s} {'peak MB':>8s}")
    for name in args.workloads:
        spec = [*WORKLOADS[name], *COMMON, f"experiment.rounds={rounds}",
                f"evaluation.every={rounds}", f"output.run_dir='{out_dir / name}'"]
        fedavg = not any(o.startswith("strategy.name=") for o in WORKLOADS[name])
        with_flower = fedavg and not args.skip_flower
        ways = {way: (way, spec) for way in ("raw1", "raw2", "fedsim", *(["flower"] * with_flower))}
        if any(f"model.name={m}" in WORKLOADS[name] for m in LOCKSTEP_MODELS):  # without lockstep
            ways["fedsim 1by1"] = ("fedsim", [*spec, "engine.lockstep=false"])
        if "model.name=logreg" not in WORKLOADS[name]:
            ways["fedsim vmap"] = ("fedsim", [*spec, "engine.lockstep=false", "engine.vectorize=on"])
        results = {way: measure(mode, overrides) for way, (mode, overrides) in ways.items()}
        raw_way = min(("raw1", "raw2"), key=lambda w: results[w]["median"])
        for way, r in results.items():
            label = way + (" *" if way == raw_way else "")
            print(f"{name:11s} {label:12s} {r['median']:9.3f} {r['first']:7.2f} {r['peak_mb']:8.0f}")
        raw, fed = results[raw_way]["median"], results["fedsim"]["median"]
        summary[name] = {"fedsim_over_raw": round(fed / raw, 3)}
        print(f"{name:11s} fedsim/raw = {fed / raw:.2f}")
        if "flower" in results:
            flower = results["flower"]["median"]
            summary[name]["flower_per_client_over_fedsim"] = round(flower / fed, 3)
            print(f"{name:11s} flower-per-client/fedsim = {flower / fed:.2f}")
        if "fedsim vmap" in results:
            vmap = results["fedsim vmap"]["median"]
            one_by_one = results.get("fedsim 1by1", results["fedsim"])["median"]
            summary[name]["vmap_over_raw"] = round(vmap / raw, 3)
            summary[name]["vmap_over_one_by_one"] = round(vmap / one_by_one, 3)
            print(f"{name:11s} fedsim vmap/raw = {vmap / raw:.2f}   "
                  f"fedsim vmap/one-by-one = {vmap / one_by_one:.2f}")
        if "fedsim 1by1" in results:
            speedup = results["fedsim 1by1"]["median"] / fed
            summary[name]["lockstep_speedup"] = round(speedup, 3)
            print(f"{name:11s} fedsim one-by-one / fedsim lockstep = {speedup:.2f}")
    if not args.no_scale:
        scale = {}
        for population in (1_000, 100_000):
            spec = [*WORKLOADS["tiny"], *COMMON, f"data.num_clients={population}",
                    "data.synthetic.max_client_size=200", f"experiment.rounds={rounds}",
                    f"evaluation.every={rounds}", f"output.run_dir='{out_dir / str(population)}'"]
            scale[population] = measure("fedsim", spec)
            print(f"{'scale':11s} {population:>7d} clients {scale[population]['median']:9.3f} s/round "
                  f"{scale[population]['peak_mb']:8.0f} MB")
        summary["scale"] = {"100k_over_1k": round(scale[100_000]["median"] / scale[1_000]["median"], 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
