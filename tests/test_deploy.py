"""Deployment: node data files, the roster, and real SuperLink/SuperNode processes on loopback
with TLS and node authentication."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from cryptography import x509
from flwr.app import RecordDict

from clients.state import RecordStateStore
from fedsim.config import load_config
from fedsim.deploy.credentials import make_node_key, make_tls
from fedsim.deploy.local import LocalDeployment, executable, free_port, node_configs, read_rounds, run_local
from fedsim.deploy.node_data import NodeData, load_node_data, read_data_file
from fedsim.deploy.serverapp import config_from_run_config
from fedsim.errors import ConfigError, DataError
from fedsim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"


def small_config(tmp_path: Path, *extra: str):
    return load_config(QUICKSTART, ["data.num_clients=3", "experiment.rounds=3",
                                    f"output.dir={tmp_path / 'runs'}", *extra])


# ---- node data ---------------------------------------------------------------------------
def test_npz_file_with_and_without_test_split(tmp_path):
    config = small_config(tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)).astype(np.float32), np.repeat([0, 1], 20)
    np.savez(tmp_path / "full.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    data = read_data_file(tmp_path / "full.npz", config, client_id=0)
    assert np.array_equal(data.x_test, x[30:]) and data.y_train.dtype == np.int64
    np.savez(tmp_path / "train.npz", x_train=x, y_train=y)
    held = read_data_file(tmp_path / "train.npz", config, client_id=0)
    fraction = config.data.client_test_fraction
    assert len(held.y_test) == 2 * round(20 * fraction) and len(held.y_train) + len(held.y_test) == 40
    again = read_data_file(tmp_path / "train.npz", config, client_id=0)
    assert np.array_equal(held.y_test, again.y_test)  # the held-out split is reproducible


def test_csv_file_columns(tmp_path):
    config = small_config(tmp_path)
    frame = pd.DataFrame({"f1": [0.5, 1.0, 2.0, 3.0], "f2": [1, 2, 3, 4], "label": [0, 1, 0, 1],
                          "split": ["train", "train", "train", "test"], "group": [0, 1, 1, 0]})
    frame.to_csv(tmp_path / "c.csv", index=False)
    data = read_data_file(tmp_path / "c.csv", config, client_id=1)
    assert data.x_train.shape == (3, 2) and data.x_test.tolist() == [[3.0, 4.0]]
    assert data.z_train.tolist() == [0, 1, 1] and data.y_test.tolist() == [1]
    images = NodeData(1, data).shaped((1, 2, 1))  # flat rows as the model's input shape
    assert images.data.x_train.shape == (3, 1, 2, 1) and images.data.x_test[0, 0, 1, 0] == 4.0
    frame.assign(f2=["a", "b", "c", "d"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"must be numeric.*\['f2'\]"):
        read_data_file(tmp_path / "bad.csv", config, client_id=1)


def test_node_config_errors_name_the_fix(tmp_path):
    config = small_config(tmp_path)
    with pytest.raises(DataError, match="names no client"):
        load_node_data({}, config)
    with pytest.raises(DataError, match="does not exist"):
        load_node_data({"client-id": 0, "data-file": str(tmp_path / "missing.npz")}, config)
    with pytest.raises(DataError, match="unknown format"):
        (tmp_path / "x.txt").write_text("1")
        load_node_data({"client-id": 0, "data-file": str(tmp_path / "x.txt")}, config)
    with pytest.raises(DataError, match="out of range"):
        load_node_data({"partition-id": 7, "cache-dir": str(tmp_path)}, config)


def test_partition_node_holds_the_simulated_client(tmp_path):
    from fedsim.data.federation import build_federation

    config = small_config(tmp_path)
    node = load_node_data({"partition-id": 2, "cache-dir": str(tmp_path / "cache")}, config)
    expected = build_federation(config.data, config.experiment.seed).client_data(2)
    assert node.client_id == 2
    assert np.array_equal(node.data.x_train, expected.x_train)
    assert np.array_equal(node.data.y_test, expected.y_test)
    with pytest.raises(DataError, match="holds client 2's data, not client 1's"):
        node.client_data(1)


def test_record_state_store_round_trip():
    store = RecordStateStore(RecordDict())
    assert store.load(3, "scaffold") is None
    store.save(3, "scaffold", {"w": np.arange(4.0)})
    assert np.array_equal(store.load(3, "scaffold")["w"], np.arange(4.0))
    assert store.load(4, "scaffold") is None


def test_run_config_resolves_bundled_experiment_and_overrides():
    config = config_from_run_config({"experiment": "experiments/quickstart.toml",
                                     "overrides": "experiment.rounds=2 'experiment.name=a b'"})
    assert config.experiment.rounds == 2 and config.experiment.name == "a b"
    with pytest.raises(ConfigError, match="not a file"):
        config_from_run_config({"experiment": "experiments/nope.toml"})


def test_simulation_only_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="simulation-only"):
        run_local(QUICKSTART, ["evaluation.decomposition=true", f"output.dir={tmp_path}"])


def test_tls_certificate_covers_loopback(tmp_path):
    files = make_tls(tmp_path, ["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    _, public = make_node_key(tmp_path, "n0")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


# ---- real processes on loopback ------------------------------------------------------------
def final_model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "model.npz") as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.mark.slow
def test_a_deployed_message_process_imports_no_data_libraries():
    """Every deployed message starts a new process: fedsim's ClientApp must not pull pandas,
    SciPy or the dataset libraries into it (0.5 s of each message's start, measured)."""
    heavy = ["pandas", "scipy", "sklearn", "datasets", "flwr_datasets", "dp_accounting", "cvxpy",
             "matplotlib"]
    code = f"import sys, fedsim.deploy.clientapp; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_deploy_local_matches_simulation(tmp_path):
    """Three SuperNodes with TLS and node authentication run SCAFFOLD (client state in
    Context.state), the client evaluation riding on the training messages; the run directory
    and the global model equal the simulation's."""
    extra = ["strategy.name=scaffold", "strategy.clients_per_round=2", "evaluation.with_training=true"]
    run_dir = run_local(QUICKSTART, [f"output.dir={tmp_path / 'deployed'}", "experiment.rounds=3",
                                     *extra], num_nodes=3, timeout=600)
    for name in ("config.json", "rounds.parquet", "clients.parquet", "federation.parquet",
                 "summary.json", "model.npz", "log.txt"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "deployment" / "keys").exists()  # throwaway private keys are deleted
    superlink_log = (run_dir / "deployment" / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log  # TLS was on
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1, 2, 3] and (rounds["num_failures"].dropna() == 0).all()

    simulated = run_experiment(small_config(tmp_path, *extra, "engine.backend=inprocess",
                                            f"output.dir={tmp_path / 'simulated'}"))
    deployed_model, simulated_model = final_model(run_dir), final_model(simulated.run_dir)
    for key, value in simulated_model.items():
        np.testing.assert_allclose(deployed_model[key], value, atol=1e-5, rtol=0)
    for column in ("test_accuracy", "test_loss", "train_loss", "client_eval_accuracy"):
        np.testing.assert_allclose(rounds[column], simulated.rounds[column], atol=1e-5)


def test_deploy_local_with_secure_aggregation_matches_simulation(tmp_path):
    """`deployment.secure_aggregation = true`: the training round runs SecAgg+ on the three
    SuperNodes, and the model is the simulation's to the quantization."""
    extra = ["strategy.clients_per_round=3", "evaluation.with_training=true", "experiment.rounds=1"]
    run_dir = run_local(QUICKSTART, [f"output.dir={tmp_path / 'deployed'}",
                                     "deployment.secure_aggregation=true", *extra], num_nodes=3, timeout=600)
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds["secure_aggregation_clients"].dropna().tolist() == [3.0]
    assert "secure aggregation (SecAgg+)" in (run_dir / "log.txt").read_text()
    simulated = run_experiment(small_config(tmp_path, *extra, "engine.backend=inprocess",
                                            f"output.dir={tmp_path / 'simulated'}"))
    deployed_model = final_model(run_dir)
    for key, value in final_model(simulated.run_dir).items():
        np.testing.assert_allclose(deployed_model[key], value, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_dead_supernode_is_reported_and_the_run_goes_on(tmp_path):
    config_file = tmp_path / "exp.toml"
    config_file.write_text(QUICKSTART.read_text())
    run_dir = tmp_path / "run"
    overrides = ["data.num_clients=3", "experiment.rounds=3", "strategy.clients_per_round=3",
                 "engine.timeout=30", f"output.run_dir={run_dir}"]
    killed = []

    def kill_after_first_round() -> None:
        rounds = read_rounds(run_dir)
        if not killed and rounds is not None and rounds["round"].max() >= 1:
            os.killpg(deployment.nodes[2].process.pid, signal.SIGKILL)  # the machine dies
            killed.append(time.monotonic())

    config = small_config(tmp_path)
    for client in range(3):  # the nodes read their data from CSV files
        node = load_node_data({"partition-id": client, "cache-dir": str(tmp_path / "cache")}, config)
        parts = [(node.data.x_train, node.data.y_train, "train"),
                 (node.data.x_test, node.data.y_test, "test")]
        frame = pd.concat([pd.DataFrame(x.reshape(len(y), -1)).add_prefix("f")
                           .assign(label=y, split=split) for x, y, split in parts])
        frame.to_csv(tmp_path / f"client-{client}.csv", index=False)
    workspace = tmp_path / "deployment"
    files = str(tmp_path / "client-{id}.csv")
    with LocalDeployment(workspace, node_configs(3, workspace, files)) as deployment:
        deployment.submit(config_file, overrides, kill_after_first_round, timeout=600,
                          app_dir=ROOT)  # `flwr run <source tree>`: fedsim travels in the bundle
    assert killed
    rounds = pd.read_parquet(run_dir / "rounds.parquet").set_index("round")
    assert rounds.index.max() == 3 and (run_dir / "summary.json").exists()
    clients = pd.read_parquet(run_dir / "clients.parquet")
    errors = clients[clients["client_id"] == 2]["error"].dropna()
    assert len(errors) >= 1  # the dead node's client was reported as failed
    assert rounds.loc[1, "num_clients"] == 3
    assert (rounds.loc[2:, "num_clients"] == 2).all()  # the others went on
    assert np.isfinite(rounds.loc[3, "test_accuracy"])


def live_processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every live (non-zombie) process."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = (os.getpgid(proc.pid), " ".join(proc.cmdline()))
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_interrupted_deploy_stops_every_process_it_started(tmp_path, stop):
    run_dir = tmp_path / "run"
    cli = subprocess.Popen([executable("fedsim"), "deploy", "local", str(QUICKSTART), "--nodes", "2",
                            "--set", f"output.run_dir={run_dir}"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (run_dir / "deployment" / "logs" / "run.log").exists():
        assert time.monotonic() < deadline and cli.poll() is None
        time.sleep(0.2)
    time.sleep(3)  # the run has started: the SuperLink has spawned its ServerApp process
    started = {pid: info for pid, info in live_processes().items()
               if str(run_dir / "deployment") in info[1]}
    assert len(started) >= 4  # SuperLink, 2 SuperNodes, flwr run (each leads its own group)
    groups = {group for group, _ in started.values()}
    assert len([p for p, (g, _) in live_processes().items() if g in groups]) > len(started)
    cli.send_signal(stop)
    assert cli.wait(timeout=60) != 0
    time.sleep(1)
    assert [info for info in live_processes().values() if info[0] in groups] == []
    assert not (run_dir / "deployment" / "keys").exists()


@pytest.mark.slow
def test_unregistered_node_is_refused(tmp_path):
    with LocalDeployment(tmp_path / "ws", []) as deployment:
        stranger, _ = make_node_key(tmp_path / "other", "stranger")  # never registered
        node = deployment.start_node("stranger", stranger, "client-id=0",
                                     tmp_path / "ws" / "tls" / "ca.crt")
        assert node.process.wait(timeout=60) != 0
    log = node.log.read_text()
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log


@pytest.mark.slow
def test_unreachable_superlink_fails_fast_with_a_clear_error(tmp_path):
    nowhere = LocalDeployment(tmp_path, [], link_port=free_port(), node_patience=5)
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    key, _ = make_node_key(tmp_path / "keys", "n0")
    try:
        node = nowhere.start_node("n0", key, "client-id=0", tls.ca_cert)
        code = node.process.wait(timeout=60)
    finally:
        nowhere.stop()
    assert code != 0
    log = node.log.read_text()
    assert "could not establish a connection to the SuperLink" in log and "Connection refused" in log


def test_flower_app_components_are_declared(tmp_path):
    import tomllib

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedsim.deploy.serverapp:app",
                                 "clientapp": "fedsim.deploy.clientapp:app"}
    assert (ROOT / app["config"]["experiment"]).is_file()
    built = subprocess.run([executable("flwr"), "build", "--app", str(ROOT)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FLWR_HOME": str(tmp_path)})
    assert built.returncode == 0, built.stdout + built.stderr
    with zipfile.ZipFile(next(tmp_path.glob("*.fab"))) as fab:  # the experiments travel with it
        assert "experiments/quickstart.toml" in fab.namelist()
