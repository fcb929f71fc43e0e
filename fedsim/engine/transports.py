"""How a round's packed messages reach the workers and come back, through a Flower Grid (Ray's,
the SuperLink's, or the in-process one)."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedsim.engine.protocol import content_bytes, from_record, to_record
from fedsim.engine.strategy import FedsimStrategy
from fedsim.errors import FedsimError
from fedsim.method import Arrays


def wait_for_nodes(grid: Grid, count: int, timeout: float = 120.0) -> list[int]:
    """Block until `count` nodes have registered (they do so asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FedsimError(f"only {len(nodes)} of {count} nodes connected within {timeout:.0f} s")
        time.sleep(0.05)


def send_and_receive(grid: Grid, messages: list, timeout: float, pull_interval: float) -> list:
    """Push `messages` and pull their replies every `pull_interval` seconds until all are in or
    `timeout` passes (Flower's own send-and-receive waits 3 s between pulls in deployment,
    longer than most rounds' work); returns the replies that came."""
    waiting = set(grid.push_messages(messages))
    replies = []
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        if waiting:
            time.sleep(pull_interval)
    return replies


class GridTransport:
    """Drives the fedsim strategy through a Grid, the same way for every backend: configure,
    push, pull the replies, aggregate (Flower's message-API calls, nothing private)."""

    def __init__(self, strategy: FedsimStrategy, grid: Grid, timeout: float,
                 pull_interval: float = 0.01) -> None:
        self.strategy, self.grid, self.timeout = strategy, grid, timeout
        self.pull_interval = pull_interval

    def _exchange(self, messages) -> tuple[list, int]:
        messages = list(messages)
        replies = send_and_receive(self.grid, messages, self.timeout, self.pull_interval)
        size = sum(content_bytes(m.content) for m in messages)
        size += sum(content_bytes(r.content) for r in replies if not r.has_error())
        return replies, size

    def train(self, server_round: int, arrays: Arrays) -> tuple[Arrays | None, dict, int]:
        messages = self.strategy.configure_train(server_round, to_record(arrays), ConfigRecord(),
                                                 self.grid)
        replies, size = self._exchange(messages)
        record, metrics = self.strategy.aggregate_train(server_round, replies)
        new = from_record(record) if record is not None else None
        return new, dict(metrics), size

    def evaluate(self, server_round: int, arrays: Arrays) -> tuple[dict, int]:
        messages = self.strategy.configure_evaluate(server_round, to_record(arrays),
                                                    ConfigRecord(), self.grid)
        replies, size = self._exchange(messages)
        return dict(self.strategy.aggregate_evaluate(server_round, replies)), size

    def setup(self) -> tuple[dict, int]:
        """The setup phase: every client reports once to the components that ask."""
        replies, size = self._exchange(self.strategy.configure_setup(self.grid))
        return self.strategy.aggregate_setup(replies), size
