"""Per-client state that outlives a round (control variates, personal layers), keyed by client id."""

from __future__ import annotations

from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


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
