"""End-to-end runs: reproducibility, Ray/in-process parity, failures, incremental results."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import clients.runtime
from fedsim.config import load_config
from fedsim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"
TIMING = ["seconds", "train_seconds"]


def run(tmp_path: Path, name: str, *overrides: str):
    config = load_config(QUICKSTART, [f"output.run_dir='{tmp_path / name}'", *overrides])
    return run_experiment(config)


def metrics(run_dir: Path, table: str = "rounds") -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / f"{table}.parquet")
    return frame.drop(columns=[c for c in TIMING if c in frame])


def model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "model.npz") as data:
        return {k: data[k] for k in data.files}


FAST = ("engine.backend=inprocess", "experiment.rounds=4")


def test_same_seed_same_results_other_seed_other_results(tmp_path):
    a = run(tmp_path, "a", *FAST)
    b = run(tmp_path, "b", *FAST)
    c = run(tmp_path, "c", *FAST, "experiment.seed=1")
    pd.testing.assert_frame_equal(metrics(a.run_dir), metrics(b.run_dir))
    pd.testing.assert_frame_equal(metrics(a.run_dir, "clients"), metrics(b.run_dir, "clients"))
    assert not np.allclose(metrics(a.run_dir).test_loss, metrics(c.run_dir).test_loss)


def test_run_directory_contents(tmp_path):
    summary = run(tmp_path, "r", *FAST)
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1, 2, 3, 4]
    assert {"test_accuracy", "test_loss", "train_loss", "num_failures", "bytes_exchanged"} <= set(rounds)
    per_client = pd.read_parquet(summary.run_dir / "clients.parquet")
    assert {"round", "client_id", "num_examples", "train_loss", "eval_accuracy",
            "train_seconds"} <= set(per_client)
    trained = per_client.dropna(subset=["train_loss"])
    assert (trained.groupby("round").size() == 10).all()
    assert (summary.run_dir / "config.json").exists() and (summary.run_dir / "log.txt").exists()
    assert set(model(summary.run_dir)) == {"1.weight", "1.bias", "3.weight", "3.bias"}


def test_evaluation_riding_on_training_gives_the_same_rows_with_fewer_messages(tmp_path):
    """With every client in every cohort, clients that evaluate the model they receive before
    training report exactly what a separate evaluation message reports for the previous round,
    per round and per client; the model is the same, and only the last round sends one."""
    every = ("data.num_clients=10", "strategy.clients_per_round=10", *FAST)
    apart = run(tmp_path, "apart", *every)
    riding = run(tmp_path, "riding", *every, "evaluation.with_training=true")
    columns = ["client_eval_loss", "client_eval_accuracy"]
    a = metrics(apart.run_dir).set_index("round")
    b = metrics(riding.run_dir).set_index("round")
    pd.testing.assert_frame_equal(a.loc[1:, columns], b.loc[1:, columns])
    assert b.loc[0, "client_eval_accuracy"] > 0  # the initial model gets a client evaluation too
    pd.testing.assert_frame_equal(a[["test_accuracy", "train_loss"]], b[["test_accuracy", "train_loss"]])
    assert (b.loc[1:3, "bytes_exchanged"] < a.loc[1:3, "bytes_exchanged"]).all()
    keys = ["round", "client_id"]
    ca = metrics(apart.run_dir, "clients").set_index(keys)
    cb = metrics(riding.run_dir, "clients").set_index(keys)
    pd.testing.assert_series_equal(ca["eval_accuracy"].dropna(), cb["eval_accuracy"].loc[1:].dropna())
    assert not cb.index.duplicated().any()


def test_failing_client_is_reported_and_the_round_goes_on(tmp_path, monkeypatch):
    original = clients.runtime.Resident.client_data

    def flaky(res, client_id):  # lockstep training fails too, then the clients go one by one
        if client_id % 2 == 0:
            raise RuntimeError("disk on fire")
        return original(res, client_id)

    monkeypatch.setattr(clients.runtime.Resident, "client_data", flaky)
    summary = run(tmp_path, "f", *FAST)
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet").set_index("round")
    assert (rounds.loc[1:, "num_failures"] > 0).all()
    assert (rounds.loc[1:, "num_clients"] > 0).all()
    per_client = pd.read_parquet(summary.run_dir / "clients.parquet")
    failed = per_client.dropna(subset=["error"])
    assert (failed.client_id % 2 == 0).all() and failed.error.str.contains("disk on fire").all()
    assert "client" in (summary.run_dir / "log.txt").read_text()


def test_a_crash_keeps_the_finished_rounds(tmp_path, monkeypatch):
    from strategies.fedavg import FedAvg

    def crash_in_round_3(self, server_round, current, result):
        if server_round == 3:
            raise RuntimeError("crash")
        return result.means["model"], {}

    monkeypatch.setattr(FedAvg, "aggregate", crash_in_round_3)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path, "x", *FAST)
    assert pd.read_parquet(tmp_path / "x" / "rounds.parquet")["round"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_quickstart_on_ray_reaches_target_and_matches_the_plain_loop(tmp_path):
    on_ray = run(tmp_path, "ray")
    plain = run(tmp_path, "plain", "engine.backend=inprocess")
    assert on_ray.rounds.test_accuracy.iloc[-1] >= 0.85
    ray_model, plain_model = model(on_ray.run_dir), model(plain.run_dir)
    for name in ray_model:
        np.testing.assert_allclose(ray_model[name], plain_model[name], atol=1e-5)
    columns = ["test_accuracy", "test_loss", "train_loss", "client_eval_accuracy"]
    np.testing.assert_allclose(on_ray.rounds[columns], plain.rounds[columns], atol=1e-5)


@pytest.mark.slow
def test_ray_runs_with_client_state_are_reproducible(tmp_path):
    spec = ("strategy.name=scaffold", "experiment.rounds=3", "evaluation.client_fraction=0.5")
    a, b = run(tmp_path, "a", *spec), run(tmp_path, "b", *spec)
    exchanged = ["bytes_exchanged"]
    pd.testing.assert_frame_equal(metrics(a.run_dir).drop(columns=exchanged),
                                  metrics(b.run_dir).drop(columns=exchanged))
    assert not (a.run_dir / "client_state").exists()  # client state travels with the clients


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A Ray cluster of two nodes with one CPU each (ray.cluster_utils), on 127.0.0.1 (a driver
    here would otherwise rewrite 127.0.0.1 to this machine's outward address)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if marker.is_file() and marker.read_text().strip() == cluster.address:
            marker.unlink()


@pytest.mark.slow
def test_scaffold_on_a_two_node_ray_cluster_equals_the_single_node_run(tmp_path, two_node_cluster):
    import ray

    spec = ("strategy.name=scaffold", "experiment.rounds=3", "engine.workers=2",
            "engine.cpus_per_worker=1")  # one worker per one-CPU node: the workers are on different nodes
    ray.init(address=two_node_cluster)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    spread = run(tmp_path, "cluster", *spec, f"engine.ray_address='{two_node_cluster}'")
    single = run(tmp_path, "single", *spec, "engine.backend=inprocess")
    for name, value in model(spread.run_dir).items():
        np.testing.assert_allclose(value, model(single.run_dir)[name], atol=1e-5)
    columns = ["test_accuracy", "train_loss", "client_eval_accuracy"]
    np.testing.assert_allclose(spread.rounds[columns], single.rounds[columns], atol=1e-5)


@pytest.fixture
def ray_cluster():
    """A Ray head started like a user's cluster (`ray start --head`) on 127.0.0.1; stopped by PID."""
    ray = Path(sys.executable).parent / "ray"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([str(ray), "status", f"--address={address}"], env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray start` leaves it
        if marker.is_file() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()


@pytest.mark.slow
def test_attaches_to_an_existing_ray_cluster(tmp_path, ray_cluster):
    attached = run(tmp_path, "cluster", "experiment.rounds=2", f"engine.ray_address='{ray_cluster}'")
    plain = run(tmp_path, "plain", "experiment.rounds=2", "engine.backend=inprocess")
    for name, value in model(attached.run_dir).items():
        np.testing.assert_allclose(value, model(plain.run_dir)[name], atol=1e-5)


def fedsim_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_cli_runs_and_prints_the_run_directory(tmp_path):
    out = fedsim_cli("run", str(QUICKSTART), "--set", "engine.backend=inprocess",
                     "--set", "experiment.rounds=2", "--set", f"output.run_dir='{tmp_path / 'cli'}'")
    assert out.returncode == 0, out.stderr
    assert f"run directory: {tmp_path / 'cli'}" in out.stderr
    assert "test_accuracy" in out.stderr and (tmp_path / "cli" / "rounds.parquet").exists()


@pytest.mark.parametrize("override, message", [
    ("data.num_client=3", "error: invalid experiment config: unknown key 'data.num_client'"),
    ("strategy.name=fedx", "error: unknown strategy 'fedx'"),
    ("data.partition.alpha=0", "error: invalid experiment config: data.partition.alpha = 0"),
])
def test_cli_bad_input_is_one_clear_line(override, message):
    out = fedsim_cli("run", str(QUICKSTART), "--set", override)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(message) and len(out.stderr.strip().splitlines()) == 1


def test_cli_missing_data_file_is_one_clear_line(tmp_path):
    out = fedsim_cli("run", str(QUICKSTART), "--set", "data.dataset=fashion-mnist",
                     "--set", f"data.root='{tmp_path}'", "--set", "engine.backend=inprocess")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download") and "Put 'train-images-idx3-ubyte.gz'" in last
