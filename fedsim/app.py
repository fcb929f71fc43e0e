"""The Flower app (composition root of the client side): the ClientApp every worker runs."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.runtime import run_evaluate, run_statistics, run_train

client_app = ClientApp()
STATISTICS_ACTION = "ggeur_statistics"  # messages of type query.ggeur_statistics


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the virtual clients packed into this message."""
    return Message(content=run_train(msg.content), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local test splits of the packed clients."""
    return Message(content=run_evaluate(msg.content), reply_to=msg)


@client_app.query(STATISTICS_ACTION)
def statistics(msg: Message, context: Context) -> Message:
    """GGEUR's statistics phase: per-class sufficient statistics of the packed clients."""
    return Message(content=run_statistics(msg.content), reply_to=msg)
