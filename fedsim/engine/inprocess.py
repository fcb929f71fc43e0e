"""The in-process backend: a Flower Grid whose worker nodes are handler calls in this process
(no Ray, no network), so the in-process loop goes through the same strategy and messages as Ray
and deployment. The reference loop for parity checks and debugging."""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid

Handler = Callable[[RecordDict], RecordDict]
HANDLER_ERROR = 1  # the error code of a reply whose handler raised


@contextmanager
def server_task_identity() -> Iterator[None]:
    """Flower messages need a run identity; outside a ServerApp give them the one a ServerApp
    would have (inside one, leave it as it is)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    if saved[0] is None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class InProcessGrid(Grid):
    """`workers` nodes; a pushed message is handled at once by the handler for its type."""

    def __init__(self, workers: int, handlers: dict[str, Handler]) -> None:
        self.workers, self.handlers = workers, handlers
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.workers + 1))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            handler = self.handlers[message.metadata.message_type]
            try:
                reply = Message(handler(message.content), reply_to=message)
            except Exception as exc:  # a crashed worker: an error reply, as Flower sends one
                traceback.print_exc()
                reply = Message(Error(HANDLER_ERROR, f"{type(exc).__name__}: {exc}"), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
