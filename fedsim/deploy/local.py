"""`fedsim deploy local`: a real deployment on this machine's loopback interface.

One SuperLink and N SuperNodes run as separate processes on 127.0.0.1, with TLS (a throwaway CA)
and SuperNode authentication (a registered key per node); `flwr run` submits the experiment as a
Flower app. Every process started here is stopped again, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil

from fedsim.config import load_config
from fedsim.deploy.credentials import TlsFiles, make_node_key, make_tls
from fedsim.deploy.server import check_deployable
from fedsim.engine.ray_backend import QUIET_ENV
from fedsim.engine.server import ProgressCallback
from fedsim.errors import FedsimError
from fedsim.registry import check_config
from fedsim.results import SUMMARY_FILE, default_run_dir, read_table

HOST = "127.0.0.1"
CONNECTION = "fedsim-local"  # the SuperLink's name in the workspace's Flower config
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsim-local"
version = "1.0.0"
description = "A fedsim experiment on a local deployment"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsim"

[tool.flwr.app.components]
serverapp = "fedsim.deploy.serverapp:app"
clientapp = "fedsim.deploy.clientapp:app"

[tool.flwr.app.config]
experiment = ""
overrides = ""
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def executable(name: str) -> str:
    """A Flower command, from this Python's environment first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FedsimError(f"'{name}' was not found; install Flower (pip install 'flwr[simulation]')")
    return found


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Started:
    """A process started here in its own process group, with its log file."""

    name: str
    process: subprocess.Popen
    log: Path

    def terminate(self) -> list[psutil.Process]:
        """Ask it, its process group and every descendant (Flower's SuperExec starts the
        ServerApp and ClientApps in groups of their own) to stop; returns them, to wait for."""
        try:
            leader = psutil.Process(self.process.pid)
            family = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        self._signal_group(signal.SIGTERM)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        return family

    def kill_group(self) -> None:
        """Kill whatever is left in its group and reap it."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on loopback with TLS and node authentication (a context
    manager: leaving it stops every process it started)."""

    workspace: Path
    node_configs: list[str]  # one `--node-config` string per SuperNode
    processes: list[Started] = field(default_factory=list)  # everything started, oldest first
    superlink: Started | None = None
    nodes: list[Started] = field(default_factory=list)
    link_port: int = 0
    node_patience: float = 60.0  # seconds a SuperNode keeps trying to reach its SuperLink

    @property
    def env(self) -> dict[str, str]:
        # N nodes share this machine's cores: without a cap every ClientApp process's torch
        # would start one thread per core, and the oversubscribed threads slow training ~10x.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.node_configs))))
        return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.workspace / "flwr-home"),
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}  # start ClientApps sooner (default 1 s)

    def _start(self, name: str, command: list[str]) -> Started:
        log = self.workspace / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       env=self.env, cwd=self.workspace, start_new_session=True)
        started = Started(name, process, log)
        self.processes.append(started)
        return started

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Certificates, the SuperLink (waiting up to `timeout` s for its port), then each node:
        a new key registered with the SuperLink, and the SuperNode using it."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        tls = make_tls(self.workspace / "tls", [HOST, "localhost"])
        self.link_port = free_port()
        self._write_connection(tls)
        link = self.superlink = self._start("superlink", [
            executable("flower-superlink"), "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", HOST, "--port", str(self.link_port)])
        deadline = time.monotonic() + timeout
        while not listening(self.link_port):
            if link.process.poll() is not None or time.monotonic() > deadline:
                raise FedsimError(f"the SuperLink did not start:\n{tail(link.log)}")
            time.sleep(0.2)
        for index, node_config in enumerate(self.node_configs):
            key = self.register_node(f"node{index}")
            self.nodes.append(self.start_node(f"node{index}", key, node_config, tls.ca_cert))

    def _write_connection(self, tls: TlsFiles) -> None:
        home = self.workspace / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.link_port}"\nroot-certificates = {json.dumps(str(tls.ca_cert))}\n')

    def register_node(self, name: str) -> Path:
        """A new key pair for a node, its public key registered with the SuperLink."""
        private, public = make_node_key(self.workspace / "keys", name)
        done = subprocess.run([executable("flwr"), "supernode", "register", str(public), CONNECTION,
                               "--name", name], env=self.env, cwd=self.workspace,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or "registered" not in done.stdout:
            raise FedsimError(f"registering {name}'s key failed:\n{done.stdout}{done.stderr}")
        return private

    def start_node(self, name: str, key: Path, node_config: str, ca_cert: Path) -> Started:
        """A SuperNode that authenticates with `key` on its own runtime port; it gives up (exits)
        when the SuperLink stays unreachable for `node_patience` seconds."""
        return self._start(name, [
            executable("flower-supernode"), "--root-certificates", str(ca_cert),
            "--auth-supernode-private-key", str(key), "--superlink", f"{HOST}:{self.link_port}",
            "--node-config", node_config, "--host", HOST, "--port", str(free_port()),
            "--max-wait-time", str(self.node_patience)])

    def submit(self, experiment: Path, overrides: list[str], progress: Callable[[], None],
               timeout: float, app_dir: Path | None = None) -> Started:
        """`flwr run` the experiment as an app (by default a minimal app that uses the installed
        fedsim; or `app_dir`, e.g. the source tree); call `progress()` about twice a second until
        the run ends. Raises when the SuperLink or every node exits early, or on timeout."""
        if app_dir is None:
            app_dir = self.workspace / "app"
            app_dir.mkdir(exist_ok=True)
            (app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
        run_config = self.workspace / "run-config.toml"
        run_config.write_text(f"experiment = {json.dumps(str(experiment.resolve()))}\n"
                              f"overrides = {json.dumps(shlex.join(overrides))}\n")
        run = self._start("run", [executable("flwr"), "run", str(app_dir), CONNECTION,
                                  "--run-config", str(run_config), "--stream"])
        deadline = time.monotonic() + timeout
        while run.process.poll() is None:
            progress()
            if self.superlink is not None and self.superlink.process.poll() is not None:
                raise FedsimError(f"the SuperLink stopped during the run:\n{tail(self.superlink.log)}")
            if self.nodes and all(node.process.poll() is not None for node in self.nodes):
                raise FedsimError(f"every SuperNode stopped; {self.nodes[0].name}'s log ends with:\n"
                                  f"{tail(self.nodes[0].log)}")
            if time.monotonic() > deadline:
                raise FedsimError(f"the run took longer than {timeout:.0f} s; stopped it")
            time.sleep(0.5)
        progress()
        return run

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process started here: all are asked at once (the newest first), then
        whatever has not exited after `grace` seconds is killed, so stopping takes one grace
        period however many nodes there are."""
        started = list(reversed(self.processes))
        family = [member for process in started for member in process.terminate()]
        _, alive = psutil.wait_procs(family, timeout=grace)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        for process in started:
            process.kill_group()


def read_rounds(run_dir: Path) -> pd.DataFrame | None:
    """The rounds written so far (None before the first)."""
    try:
        rounds = read_table(run_dir, "rounds")
    except (OSError, ValueError):
        return None
    return rounds if len(rounds) else None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def node_configs(num_nodes: int, workspace: Path, data_files: str | None) -> list[str]:
    """Each node's `--node-config`: its client id and either its own data file (`data_files` with
    `{id}` in it) or its partition of the experiment's dataset."""
    configs = []
    for client in range(num_nodes):
        if data_files:
            where = f"data-file={json.dumps(data_files.format(id=client))}"
        else:
            where = f"partition-id={client} cache-dir={json.dumps(str(workspace / 'node-data'))}"
        configs.append(f"client-id={client} {where}")
    return configs


def run_local(experiment: Path, overrides: list[str], num_nodes: int | None = None,
              data_files: str | None = None, progress: ProgressCallback | None = None,
              timeout: float = 0.0) -> Path:
    """Deploy `experiment` on a SuperLink and SuperNodes on loopback; return its run directory.

    The deployment's workspace (logs, certificates, Flower's state) is `<run_dir>/deployment`;
    its private keys are deleted when the processes stop."""
    config = load_config(experiment, overrides)
    check_config(config)
    check_deployable(config)
    overrides = list(overrides)
    if num_nodes is not None and num_nodes != config.data.num_clients:
        overrides.append(f"data.num_clients={num_nodes}")
    run_dir = default_run_dir(config).resolve()
    overrides.append(f"output.run_dir={run_dir}")
    workspace = run_dir / "deployment"
    seen = 0

    def poll() -> None:
        nonlocal seen
        rounds = read_rounds(run_dir)
        if rounds is None or progress is None:
            return
        for row in rounds[rounds["round"] > seen].to_dict("records"):
            progress(int(row["round"]), row)
        seen = int(rounds["round"].max())

    previous = signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` cleans up too
    try:
        with LocalDeployment(workspace, node_configs(num_nodes or config.data.num_clients,
                                                     workspace, data_files)) as deployment:
            run = deployment.submit(experiment, overrides, poll, timeout or float("inf"))
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workspace / "keys", ignore_errors=True)
        (workspace / "tls" / "server.key").unlink(missing_ok=True)
    if not (run_dir / SUMMARY_FILE).exists():
        raise FedsimError(f"the deployed run did not finish; its log ({run.log}) ends with:\n"
                          f"{tail(run.log)}")
    return run_dir
