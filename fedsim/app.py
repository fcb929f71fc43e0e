"""The Flower ClientApp (composition root of the client side) for simulation workers.

`make_client_app` wires the message handlers to a host: in simulation every worker serves many
virtual clients from the cached federation; a deployed node serves its own client
(`fedsim.deploy.clientapp`).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from clients.runtime import SIMULATION, Host, run_evaluate, run_setup, run_train
from fedsim.engine.strategy import SETUP_ACTION

# The in-process backend's handlers, by message type (the ClientApp's below, without Flower).
HANDLERS = {"train": run_train, "evaluate": run_evaluate, f"query.{SETUP_ACTION}": run_setup}


def make_client_app(host_for: Callable[[Context], Host], train_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp whose handlers get data, model and client state from `host_for(context)`;
    `train_mods` wrap the training handler (a deployed node's secure aggregation)."""
    app = ClientApp()

    @app.train(mods=train_mods)
    def train(msg: Message, context: Context) -> Message:
        """Train the clients packed into this message."""
        return Message(content=run_train(msg.content, host_for(context)), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the global model on the local test splits of the packed clients."""
        return Message(content=run_evaluate(msg.content, host_for(context)), reply_to=msg)

    @app.query(SETUP_ACTION)
    def setup(msg: Message, context: Context) -> Message:
        """The setup phase: the packed clients' reports (GGEUR's class statistics)."""
        return Message(content=run_setup(msg.content, host_for(context)), reply_to=msg)

    return app


client_app = make_client_app(lambda context: SIMULATION)
