"""Checkpoints: what a run carries from one round to the next, saved atomically, so that a run
continued from one ends exactly as if it had never stopped.

A checkpoint after round r holds the global arrays, every method's and add-on's server state
(`Component.save_state`: optimizer moments, control variates, fairness weights, GGEUR's shapes,
a Flower strategy), the per-client state the server keeps, the simulated clock and the streak of
failed rounds. Nothing else is needed: cohort sampling and the system model are pure functions of
(seed, round), and a client's training of (global arrays, its state, seed, round, client id).
The rows of the results tables are in the run's journals, which a resumed run cuts back to r.

One file per checkpoint, `checkpoints/round-000040.npz`: numbered arrays plus a JSON index of
what each one is. It is written to a temporary file, synced and renamed, so a crash or a full
disk while writing leaves the previous checkpoint as it was; only the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.engine.strategy import FedsimStrategy
from fedsim.errors import FedsimError
from fedsim.method import Arrays

FOLDER = "checkpoints"
INDEX = "index"
AUTO_EVERY = 10  # checkpoint_every unset: every 10th round, and every round that took longer
SLOW_ROUND_SECONDS = 2.0  # than this


@dataclass
class Checkpoint:
    """Everything needed to continue a run after `round`."""

    round: int
    arrays: Arrays  # the global model
    components: dict[str, Arrays]  # each method's and add-on's saved state, by label
    client_state: dict[int, dict[str, Arrays]]  # client id -> component label -> arrays
    engine: dict[str, Any] = field(default_factory=dict)  # simulated clock, failed-round streak,
    # and the resolved experiment the run was started with


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / FOLDER / f"round-{server_round:06d}.npz"


def _flatten(checkpoint: Checkpoint) -> tuple[list[list[Any]], list[np.ndarray]]:
    keys, arrays = [], []
    for name, array in checkpoint.arrays.items():
        keys.append(["global", name])
        arrays.append(array)
    for label, state in checkpoint.components.items():
        for name, array in state.items():
            keys.append(["component", label, name])
            arrays.append(array)
    for cid, by_label in checkpoint.client_state.items():
        for label, state in by_label.items():
            for name, array in state.items():
                keys.append(["client", int(cid), label, name])
                arrays.append(array)
    return keys, arrays


def encode(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """The checkpoint as npz members: a0, a1, ... and the JSON index naming them."""
    keys, arrays = _flatten(checkpoint)
    index = {"round": checkpoint.round, "engine": checkpoint.engine, "keys": keys}
    members = {f"a{i}": np.asarray(a) for i, a in enumerate(arrays)}
    members[INDEX] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    return members


def decode(members) -> Checkpoint:
    index = json.loads(bytes(members[INDEX]).decode())
    checkpoint = Checkpoint(index["round"], {}, {}, {}, index["engine"])
    for i, key in enumerate(index["keys"]):
        array = members[f"a{i}"]
        if key[0] == "global":
            checkpoint.arrays[key[1]] = array
        elif key[0] == "component":
            checkpoint.components.setdefault(key[1], {})[key[2]] = array
        else:
            checkpoint.client_state.setdefault(key[1], {}).setdefault(key[2], {})[key[3]] = array
    return checkpoint


def write_checkpoint(run_dir: Path, checkpoint: Checkpoint, keep: int = 1) -> Path:
    """Write `checkpoint` atomically, then delete all but the newest `keep`. A failed write (a
    full disk) leaves the earlier checkpoints intact and raises FedsimError saying so."""
    path = checkpoint_path(run_dir, checkpoint.round)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, **encode(checkpoint))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        previous = saved_rounds(run_dir)
        kept = (f"the checkpoint of round {previous[-1]} is intact" if previous
                else "no earlier checkpoint exists")
        raise FedsimError(f"could not write the checkpoint of round {checkpoint.round} in "
                          f"{path.parent}: {exc.strerror or exc}; {kept}: make room and continue with "
                          f"`fedsim run --resume {run_dir}`") from None
    for old in saved_rounds(run_dir)[:-keep]:
        checkpoint_path(run_dir, old).unlink(missing_ok=True)
    return path


def saved_rounds(run_dir: Path) -> list[int]:
    """Rounds with a complete checkpoint, oldest first."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.removeprefix("round-")) for p in folder.glob("round-*.npz"))


def remove_checkpoints(run_dir: Path) -> None:
    """Delete a run's checkpoints (a finished run needs none; a new run must not find old ones)."""
    folder = Path(run_dir) / FOLDER
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of a run, or None when it has none."""
    rounds = saved_rounds(run_dir)
    if not rounds:
        return None
    with np.load(checkpoint_path(run_dir, rounds[-1]), allow_pickle=False) as members:
        return decode(members)


class RunCheckpoints:
    """When to checkpoint a run, and moving its state between the strategy and checkpoints."""

    def __init__(self, run_dir: Path, strategy: FedsimStrategy, every: int | None, keep: int) -> None:
        """`every`: rounds between checkpoints (0: never; None: every AUTO_EVERY rounds, and after
        every round slower than SLOW_ROUND_SECONDS)."""
        self.run_dir, self.strategy = Path(run_dir), strategy
        self.every, self.keep = every, keep

    def due(self, server_round: int, round_seconds: float) -> bool:
        if self.every is None:
            return server_round % AUTO_EVERY == 0 or round_seconds > SLOW_ROUND_SECONDS
        return self.every > 0 and server_round % self.every == 0

    def save(self, server_round: int, arrays: Arrays, engine: dict[str, Any]) -> None:
        strategy = self.strategy
        components = {c.label(): c.save_state() for c in strategy.components}
        engine = {**engine, "simulated_clock": strategy.simulated_clock,
                  "experiment": strategy.config.to_json_dict()}
        write_checkpoint(self.run_dir, Checkpoint(server_round, arrays, components,
                                                  strategy.client_state, engine), self.keep)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Put a checkpoint's server and client state back into the strategy."""
        strategy = self.strategy
        for component in strategy.components:
            component.load_state(checkpoint.components.get(component.label(), {}))
        strategy.client_state = {int(cid): state for cid, state in checkpoint.client_state.items()}
        strategy.simulated_clock = float(checkpoint.engine["simulated_clock"])
