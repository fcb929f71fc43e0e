"""Per-client state that outlives a round (control variates, a previous local model), keyed by
client id and then by method and name.

In simulation the state travels with the client: the server keeps it, sends it in the client's
task and takes back what the client saved from its reply, so any worker on any machine of a Ray
cluster can train the client next. On a deployed node it lives in the node's Flower
`Context.state`, which persists between the node's messages.
"""

from __future__ import annotations

from typing import Protocol

from flwr.app import RecordDict

from fedsim.engine.protocol import Task, from_record, to_record
from fedsim.method import Arrays


class StateStore(Protocol):
    """Named arrays per client; `saved` is what a reply must carry back to the server."""

    def load(self, client_id: int, name: str) -> Arrays | None:
        ...

    def save(self, client_id: int, name: str, arrays: Arrays) -> None:
        ...

    def saved(self, client_id: int) -> dict[str, Arrays]:
        ...


class ShippedStateStore:
    """Simulation: the state that came with each client's task; what a client saves goes back."""

    def __init__(self, task: Task) -> None:
        self.incoming = {c.client_id: c.state for c in task.clients}
        self.outgoing: dict[int, dict[str, Arrays]] = {}

    def load(self, client_id: int, name: str) -> Arrays | None:
        return self.outgoing.get(client_id, {}).get(name, self.incoming.get(client_id, {}).get(name))

    def save(self, client_id: int, name: str, arrays: Arrays) -> None:
        self.outgoing.setdefault(client_id, {})[name] = arrays

    def saved(self, client_id: int) -> dict[str, Arrays]:
        return self.outgoing.get(client_id, {})


class RecordStateStore:
    """Deployed: named arrays per client in a Flower RecordDict (the node's `Context.state`);
    nothing travels back."""

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

    def saved(self, client_id: int) -> dict[str, Arrays]:
        return {}


class ClientScope:
    """One client's view of a store for one method or add-on (`ctx.store`)."""

    def __init__(self, store: StateStore, client_id: int, owner: str) -> None:
        self.store, self.client_id, self.owner = store, client_id, owner

    def load(self, name: str) -> Arrays | None:
        return self.store.load(self.client_id, f"{self.owner}/{name}")

    def save(self, name: str, arrays: Arrays) -> None:
        self.store.save(self.client_id, f"{self.owner}/{name}", arrays)


class MemoryStore(dict):
    """One client's store in a dict: what `ctx.store` offers, for running a method's client half
    on its own (in tests, or a notebook)."""

    def load(self, name: str) -> Arrays | None:
        return self.get(name)

    def save(self, name: str, arrays: Arrays) -> None:
        self[name] = arrays
