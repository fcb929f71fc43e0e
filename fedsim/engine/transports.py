"""How a round's packed tasks reach the workers: Flower's grid (Ray), or direct calls."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedsim.engine.protocol import (
    Arrays,
    ClientResult,
    content_bytes,
    encode_task,
    from_record,
    to_record,
)
from fedsim.errors import FedsimError

Handler = Callable[[RecordDict], RecordDict]


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
    """Sends the strategy's Flower messages through a Grid and hands the replies back to it."""

    def __init__(self, strategy, grid: Grid, timeout: float, pull_interval: float = 0.01) -> None:
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

    def query(self, action: str, cohort: list[int]) -> tuple[list[ClientResult], int]:
        """One exchange of message type `query.<action>` with every client of `cohort`."""
        nodes = len(list(self.grid.get_node_ids()))
        tasks = self.strategy.plan(0, {}, cohort, nodes, train=False)
        replies, size = self._exchange(self.strategy._messages(tasks, self.grid, f"query.{action}", 0))
        return self.strategy.unpack(self.strategy._replies(replies)).clients, size


class InProcessTransport:
    """Runs the workers' handlers in this process, one task after another (no Ray, no Flower
    messages): the reference loop for parity checks and debugging."""

    def __init__(self, strategy, workers: int, train_handler: Handler,
                 evaluate_handler: Handler, query_handlers: dict[str, Handler] | None = None) -> None:
        self.strategy, self.workers = strategy, workers
        self.handlers = {True: train_handler, False: evaluate_handler, **(query_handlers or {})}

    def _run(self, server_round: int, arrays: Arrays, cohort: list[int], train: bool,
             handler: str | None = None):
        replies, size = [], 0
        for task in self.strategy.plan(server_round, arrays, cohort, self.workers, train):
            content = encode_task(task)
            ids = [c.client_id for c in task.clients]
            try:
                reply = self.handlers[train if handler is None else handler](content)
            except Exception as exc:
                replies.append((ids, None, f"worker error: {type(exc).__name__}: {exc}"))
                continue
            size += content_bytes(content) + content_bytes(reply)
            replies.append((ids, reply, ""))
        return replies, size

    def train(self, server_round: int, arrays: Arrays) -> tuple[Arrays | None, dict, int]:
        replies, size = self._run(server_round, arrays, self.strategy.train_cohort(server_round),
                                  True)
        new, metrics = self.strategy.finish_train(server_round, replies)
        return new, metrics, size

    def evaluate(self, server_round: int, arrays: Arrays) -> tuple[dict, int]:
        cohort = self.strategy.evaluation_cohort(server_round)
        replies, size = self._run(server_round, arrays, cohort, False)
        return self.strategy.finish_evaluate(replies), size

    def query(self, action: str, cohort: list[int]) -> tuple[list[ClientResult], int]:
        replies, size = self._run(0, {}, cohort, False, handler=action)
        return self.strategy.unpack(replies).clients, size
