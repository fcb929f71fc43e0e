"""Runs that survive: checkpoints, `--resume` and compare's resumption give the run that would
have happened without the interruption (bit for bit); journals keep every finished round."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedsim.engine.checkpoint as checkpoint_module
from fedsim.cli import app
from fedsim.compare import load_comparison, run_comparison
from fedsim.config import load_config
from fedsim.engine.checkpoint import (
    Checkpoint,
    RunCheckpoints,
    decode,
    encode,
    latest_checkpoint,
    saved_rounds,
    write_checkpoint,
)
from fedsim.errors import FedsimError
from fedsim.results import read_journal, read_table
from fedsim.resume import differences
from fedsim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"
WALL_CLOCK = ["seconds", "train_seconds"]  # the only columns a resumed run may change
FAST = ["engine.backend=inprocess", "experiment.rounds=6", "client.local_epochs=1",
        "output.checkpoint_every=2"]
STRATEGIES = {
    "fedavg": ["strategy.name=fedavg"],
    "fedadam": ["strategy.name=fedadam"],
    "scaffold": ["strategy.name=scaffold"],
    "fairfed": ["strategy.name=fairfed", "data.dataset=adult", "model.name=logreg",
                "data.num_clients=6", "strategy.clients_per_round=4"],
    "flwr:FedAdam": ["strategy.name=flwr:FedAdam"],
    "moon+ggeur": ["strategy.name=moon", "ggeur.enabled=true", "data.embedding=identity"],
    # per-client models; GGEUR's setup phase is not run again
    "fedprox, system model": ["strategy.name=fedprox", "system.dropout=0.2", "system.stragglers=0.3",
                              "system.speed_sigma=0.5"],
}


class Interrupted(Exception):
    pass


def stop_after(last_round: int):
    def progress(server_round: int, row: dict) -> None:
        if server_round == last_round:
            raise Interrupted

    return progress


def assert_same_run(a: Path, b: Path) -> None:
    """Same final model bit for bit, same rows in both tables (wall-clock columns aside)."""
    with np.load(a / "model.npz") as first, np.load(b / "model.npz") as second:
        assert first.files == second.files
        for name in first.files:
            assert np.array_equal(first[name], second[name]), name
    for table in ("rounds", "clients"):
        left, right = (pd.read_parquet(d / f"{table}.parquet") for d in (a, b))
        pd.testing.assert_frame_equal(left.drop(columns=WALL_CLOCK, errors="ignore"),
                                      right.drop(columns=WALL_CLOCK, errors="ignore"), check_exact=True)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_resumed_run_is_the_run_that_was_never_interrupted(tmp_path, strategy):
    spec = None if strategy == "fairfed" else QUICKSTART
    overrides = [*FAST, *STRATEGIES[strategy]]
    run_experiment(load_config(spec, [*overrides, f"output.run_dir={tmp_path / 'a'}"]))
    config = load_config(spec, [*overrides, f"output.run_dir={tmp_path / 'b'}"])
    with pytest.raises(Interrupted):  # stopped after round 5; its last checkpoint is round 4
        run_experiment(config, progress=stop_after(5))
    assert read_table(tmp_path / "b", "rounds")["round"].tolist() == [0, 1, 2, 3, 4, 5]
    assert saved_rounds(tmp_path / "b") == [4]
    run_experiment(config, resume=True)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "resumed after round 4 from its checkpoint" in log
    assert log.count("setup phase:") == ("ggeur" in strategy)  # a setup phase runs once per run
    assert saved_rounds(tmp_path / "b") == []  # a finished run keeps no checkpoint


def test_a_checkpoint_holds_every_kind_of_state_exactly():
    checkpoint = Checkpoint(
        7, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "steps": np.array(3, dtype=np.int64)},
        {"fedadam": {"m.w": np.full((2, 3), 0.5)}, "ggeur": {}},
        {3: {"scaffold": {"w": np.ones(2, dtype=np.float16)}}, 11: {"moon": {"w": np.zeros(1)}}},
        {"simulated_clock": 1.25, "failed_streak": [[6, 2, "boom"]]})
    back = decode(encode(checkpoint))
    assert back.round == 7 and back.engine == checkpoint.engine
    assert back.components["fedadam"]["m.w"].tolist() == [[0.5] * 3] * 2
    assert back.arrays["w"].dtype == np.float32 and back.arrays["steps"].dtype == np.int64
    assert back.client_state[3]["scaffold"]["w"].dtype == np.float16
    assert set(back.client_state) == {3, 11}


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for rnd in range(1, 6):
        write_checkpoint(tmp_path, Checkpoint(rnd, {"w": np.full(2, rnd)}, {}, {}, {}), keep=2)
    assert saved_rounds(tmp_path) == [4, 5]
    assert latest_checkpoint(tmp_path).arrays["w"].tolist() == [5, 5]
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_when_checkpoints_are_due():
    auto, every3, never = (RunCheckpoints(Path("."), None, every, 1) for every in (None, 3, 0))
    assert [r for r in range(1, 31) if auto.due(r, 0.1)] == [10, 20, 30]
    assert auto.due(7, 2.5)  # a slow round is saved by default
    assert [r for r in range(1, 10) if every3.due(r, 10.0)] == [3, 6, 9]
    assert not any(never.due(r, 10.0) for r in range(1, 30))


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "b"
    sets = [a for o in [*FAST, f"output.run_dir={run_dir}"] for a in ("--set", o)]
    real_savez, real_to_parquet = np.savez, pd.DataFrame.to_parquet
    disk_full = []

    def full_disk_at_round_4(handle, **members):
        if decode(members).round == 4:
            disk_full.append(True)
            handle.write(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(handle, **members)

    def to_parquet(self, *args, **kwargs):  # the tables cannot be written either, once it is full
        if disk_full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_to_parquet(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.np, "savez", full_disk_at_round_4)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    out = CliRunner().invoke(app, ["run", str(QUICKSTART), *sets])
    assert out.exit_code == 2
    last = out.output.strip().splitlines()[-1]
    assert last.startswith("error: could not write the checkpoint of round 4") and "No space left" in last
    assert "the checkpoint of round 2 is intact" in last and f"fedsim run --resume {run_dir}" in last
    assert saved_rounds(run_dir) == [2] and not list((run_dir / "checkpoints").glob("*.tmp"))
    assert read_table(run_dir, "rounds")["round"].max() == 4  # finished rounds are kept

    monkeypatch.undo()
    resumed = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    run_experiment(load_config(QUICKSTART, [*FAST, f"output.run_dir={tmp_path / 'a'}"]))
    assert_same_run(tmp_path / "a", run_dir)


def test_resuming_with_an_edited_experiment_is_refused_naming_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(QUICKSTART, [*FAST, f"output.run_dir={run_dir}"])
    with pytest.raises(Interrupted):
        run_experiment(config, progress=stop_after(3))
    sets = [a for o in [*FAST, "client.lr=0.2", "strategy.clients_per_round=5"] for a in ("--set", o)]
    out = CliRunner().invoke(app, ["run", str(QUICKSTART), *sets, "--resume", str(run_dir)])
    assert out.exit_code == 2
    line = out.output.strip().splitlines()[-1]
    assert "client.lr: 0.1 -> 0.2" in line and "strategy.clients_per_round: 10 -> 5" in line
    assert "Traceback" not in out.output
    same = [a for o in FAST for a in ("--set", o)]  # the same experiment continues
    out = CliRunner().invoke(app, ["run", str(QUICKSTART), *same, "--resume", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert read_table(run_dir, "rounds")["round"].tolist() == list(range(7))


def test_what_cannot_be_resumed_is_one_clear_line(tmp_path):
    out = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "is not a run directory" in out.output
    out = CliRunner().invoke(app, ["run"])
    assert out.exit_code == 2 and "--resume RUN_DIR" in out.output
    run_experiment(load_config(QUICKSTART, [*FAST, "experiment.rounds=1", f"output.run_dir={tmp_path}"]))
    out = CliRunner().invoke(app, ["run", "--resume", str(tmp_path)])
    assert out.exit_code == 2 and "is a finished run" in out.output


def test_differences_name_changed_added_and_removed_keys():
    ran = {"client": {"lr": 0.1}, "strategy": {"name": "fedprox", "mu": 0.01},
           "output": {"run_dir": "a", "checkpoint_every": 2}}
    now = {"client": {"lr": 0.1}, "strategy": {"name": "fedavg"},
           "output": {"run_dir": "b", "checkpoint_every": 5}}
    assert differences(ran, now) == ["strategy.mu: 0.01 -> '(not set)'",
                                     "strategy.name: 'fedprox' -> 'fedavg'"]


def test_journals_only_grow_and_survive_a_cut_off_line(tmp_path):
    run_dir = tmp_path / "run"
    snapshots = []

    def record(server_round: int, row: dict) -> None:
        snapshots.append((run_dir / "rounds.jsonl").read_bytes())

    config = load_config(QUICKSTART, [*FAST, f"output.run_dir={run_dir}"])
    with pytest.raises(Interrupted):
        run_experiment(config, progress=lambda r, row: (record(r, row), stop_after(4)(r, row)))
    assert all(later.startswith(earlier) for earlier, later in zip(snapshots, snapshots[1:], strict=False))
    assert len(snapshots[-1].splitlines()) == 5  # rounds 0-4, each appended once
    with open(run_dir / "clients.jsonl", "ab") as journal:
        journal.write(b'{"round": 5, "client_id": 3, "train_lo')  # a crash in mid-write
    rows = read_journal(run_dir / "clients.jsonl")
    assert rows and max(r["round"] for r in rows) == 4
    assert read_table(run_dir, "rounds")["round"].tolist() == [0, 1, 2, 3, 4]
    assert (run_dir / "rounds.parquet").is_file()  # a stopped run writes its tables too


def test_resuming_keeps_the_journal_lines_it_keeps_byte_for_byte(tmp_path):
    from fedsim.results import RunWriter

    config = load_config(QUICKSTART, FAST)
    rounds = ['{"round": 0, "test_accuracy": 0.1}\n', '{"round": 1, "train_loss": 0.25}\n',
              '{"round": 2, "train_loss": 0.125, "diverged": 1.0}\n']
    (tmp_path / "rounds.jsonl").write_text("".join(rounds) + '{"round": 3, "tra')
    (tmp_path / "clients.jsonl").write_text('{"round": 1, "client_id": 4}\n'
                                            '{"round": 2, "client_id": 4, "error": "died"}\n')
    RunWriter(tmp_path, config, resume_after=1)
    assert (tmp_path / "rounds.jsonl").read_text() == "".join(rounds[:2])
    assert (tmp_path / "clients.jsonl").read_text() == '{"round": 1, "client_id": 4}\n'
    assert list(read_table(tmp_path, "clients").columns) == ["round", "client_id"]  # no "error"


def test_a_new_run_in_an_old_directory_starts_without_its_checkpoints(tmp_path):
    config = load_config(QUICKSTART, [*FAST, "output.checkpoint_every=3", f"output.run_dir={tmp_path}"])
    with pytest.raises(Interrupted):
        run_experiment(config, progress=stop_after(4))
    assert saved_rounds(tmp_path) == [3]
    fresh = load_config(QUICKSTART, [*FAST, f"output.run_dir={tmp_path}"])  # checkpoints at 2, 4
    with pytest.raises(Interrupted):
        run_experiment(fresh, progress=stop_after(3))
    assert saved_rounds(tmp_path) == [2]  # the old run's round 3 is gone
    run_experiment(fresh, resume=True)
    assert "resumed after round 2" in (tmp_path / "log.txt").read_text()


def test_resuming_a_run_without_a_checkpoint_starts_it_again(tmp_path, capsys):
    config = load_config(QUICKSTART, [*FAST, "output.checkpoint_every=0", f"output.run_dir={tmp_path}"])
    with pytest.raises(Interrupted):
        run_experiment(config, progress=stop_after(3))
    summary = run_experiment(config, resume=True)
    assert "no checkpoint yet: starting it again from round 0" in capsys.readouterr().err
    assert summary.rounds["round"].tolist() == list(range(7))


def test_compare_continues_an_unfinished_cell_from_its_checkpoint(tmp_path):
    spec = tmp_path / "grid.toml"
    spec.write_text(QUICKSTART.read_text() + '\n[compare]\nname = "grid"\n'
                    '[compare.grid]\n"strategy.name" = ["fedavg", "fedadam"]\n')
    sets = [*FAST, f"output.dir={tmp_path / 'out'}"]
    folder, cells = load_comparison(spec, sets)

    def interrupted(cell) -> None:
        run_experiment(cell.config, progress=stop_after(5) if cell is cells[1] else None, resume=True)

    first = run_comparison(folder, cells, interrupted, lambda cell, status: None)
    assert first["status"].tolist() == ["done", "failed"]  # a crashed cell, as after a kill
    assert saved_rounds(cells[1].run_dir) == [4]
    table = run_comparison(folder, cells, lambda cell: run_experiment(cell.config, resume=True),
                           lambda cell, status: None)
    assert table["status"].tolist() == ["done", "done"]
    assert "resumed after round 4" in (cells[1].run_dir / "log.txt").read_text()
    run_experiment(load_config(QUICKSTART, [*FAST, "strategy.name=fedadam",
                                            f"output.run_dir={tmp_path / 'alone'}"]))
    assert_same_run(tmp_path / "alone", cells[1].run_dir)


def test_a_failed_checkpoint_write_raises_a_clear_error(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(2)}, {}, {}, {}))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "replace", no_space)
    with pytest.raises(FedsimError, match="checkpoint of round 1 is intact"):
        write_checkpoint(tmp_path, Checkpoint(2, {"w": np.ones(2)}, {}, {}, {}))
    assert saved_rounds(tmp_path) == [1] and latest_checkpoint(tmp_path).arrays["w"].tolist() == [0, 0]


# ---- a real SIGKILL of the whole `fedsim run` process group, on Ray and in-process -------------
def fedsim_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", *args]


def kill_mid_run(run_dir: Path, overrides: list[str], after_rounds: int) -> None:
    """Start `fedsim run`, SIGKILL its process group once `after_rounds` rounds are written."""
    sets = [a for o in [*overrides, f"output.run_dir={run_dir}"] for a in ("--set", o)]
    process = subprocess.Popen(fedsim_command("run", str(QUICKSTART), *sets), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = run_dir / "rounds.jsonl"
    deadline = time.monotonic() + 300
    while not (journal.is_file() and len(read_journal(journal)) > after_rounds):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "inprocess"])
def test_a_sigkilled_run_resumes_to_the_same_result(tmp_path, backend):
    overrides = [f"engine.backend={backend}", "experiment.rounds=12", "output.checkpoint_every=3",
                 "strategy.name=scaffold"]
    kill_mid_run(tmp_path / "b", overrides, after_rounds=7)
    before = latest_checkpoint(tmp_path / "b").round
    assert before >= 6 and before % 3 == 0
    resumed = subprocess.run(fedsim_command("run", "--resume", str(tmp_path / "b")),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    sets = [a for o in [*overrides, f"output.run_dir={tmp_path / 'a'}"] for a in ("--set", o)]
    whole = subprocess.run(fedsim_command("run", str(QUICKSTART), *sets), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert f"resumed after round {before}" in (tmp_path / "b" / "log.txt").read_text()


KILLER = '''
import os, signal
from strategies.fedavg import FedAvg

class KillsItsWorker(FedAvg):
    """FedAvg whose first client to finish in round 2 kills its own worker process (once)."""
    def after_training(self, ctx, model):
        if ctx.server_round == 2:
            try:  # the first of the two workers to get here, and only once
                os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().after_training(ctx, model)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().after_training(ctx, model)
'''


@pytest.mark.slow
def test_a_ray_worker_killed_mid_round_fails_its_clients_and_is_replaced(tmp_path):
    plugin = tmp_path / "killer.py"
    plugin.write_text(KILLER.format(marker=str(tmp_path / "killed")))
    config = load_config(QUICKSTART, ["experiment.rounds=5", "client.local_epochs=1",
                                      f"strategy.name={plugin}:KillsItsWorker",
                                      f"output.run_dir={tmp_path / 'run'}"])
    rounds = run_experiment(config).rounds.set_index("round")
    assert (tmp_path / "killed").is_file()
    assert rounds.loc[2, "num_failures"] > 0 and rounds.loc[2, "num_clients"] > 0
    # a new worker takes its place; on a loaded machine its restart can outlast the next round
    # (0.2 s), whose clients on it then fail the same way; after that every client trains
    assert rounds.loc[3, "num_failures"] <= rounds.loc[2, "num_failures"]
    assert (rounds.loc[[1, 4, 5], "num_failures"] == 0).all()
    assert (rounds.loc[[1, 4, 5], "num_clients"] == 10).all()
    errors = pd.read_parquet(tmp_path / "run" / "clients.parquet").dropna(subset=["error"])
    assert set(errors["round"]) <= {2, 3} and errors["error"].str.contains("ray.exceptions.Actor").all()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 5


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch):
    import fedsim.cli

    def interrupt_at_round_3(row: dict) -> str:
        if row["round"] == 3:
            raise KeyboardInterrupt
        return ""

    monkeypatch.setattr(fedsim.cli, "round_status", interrupt_at_round_3)
    sets = [a for o in [*FAST, f"output.dir={tmp_path}"] for a in ("--set", o)]
    out = CliRunner().invoke(app, ["run", str(QUICKSTART), *sets])
    assert out.exit_code == 130
    run_dir = next(tmp_path.iterdir())
    assert f"continue with `fedsim run --resume {run_dir}`" in " ".join(out.output.split())
    assert read_table(run_dir, "rounds")["round"].tolist() == [0, 1, 2, 3]
    monkeypatch.undo()
    out = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert "resumed after round 2" in (run_dir / "log.txt").read_text()
