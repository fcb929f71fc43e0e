"""Per-client state that outlives a round (control variates, personal layers), keyed by client id.

In simulation it lives in files under the run directory (any worker process may train a client
next round); on a deployed node, in the node's Flower `Context.state`, which persists between
the node's messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import RecordDict

from fedsim.engine.protocol import from_record, to_record

Arrays = dict[str, np.ndarray]


class StateStore(Protocol):
    """Named arrays per client."""

    def load(self, client_id: int, name: str) -> Arrays | None:
        ...

    def save(self, client_id: int, name: str, arrays: Arrays) -> None:
        ...


class ClientStateStore:
    """Named arrays per client, stored as `.npz` files under `<run_dir>/client_state/`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / "client_state"

    def _path(self, client_id: int, name: str) -> Path:
        return self.root / name / f"{client_id}.npz"

    def load(self, client_id: int, name: str) -> Arrays | None:
        path = self._path(client_id, name)
        if not path.exists():
            return None
        with np.load(path) as data:
            return {key: data[key] for key in data.files}

    def save(self, client_id: int, name: str, arrays: Arrays) -> None:
        path = self._path(client_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)


class RecordStateStore:
    """Named arrays per client kept in a Flower RecordDict (a deployed node's `Context.state`)."""

    def __init__(self, records: RecordDict) -> None:
        self.records = records

    @staticmethod
    def _key(client_id: int, name: str) -> str:
        return f"fedsim-state.{name}.{client_id}"

    def load(self, client_id: int, name: str) -> Arrays | None:
        key = self._key(client_id, name)
        if key not in self.records:
            return None
        return from_record(self.records[key])

    def save(self, client_id: int, name: str, arrays: Arrays) -> None:
        self.records[self._key(client_id, name)] = to_record(arrays)
