"""The method unit: one federated method, both halves in one class a reader reads top to bottom.

A `Method` holds its parameters (a pydantic `Params` model), what each client is told (a typed
`Plan`), its client half (extra loss terms, a hook on the training data before local training,
what it sends back and keeps per client after it) and its server half (`aggregate(current,
result) -> (arrays, metrics)`). The engine runs the server half on the server and, from the same
class, the client half on every worker or node. A method's only memory between rounds is
`self.state` (named arrays: server optimizer moments, control variates, fairness weights), so
the engine can see and save all of it. An `AddOn` (GGEUR, differential privacy) has the client half,
an optional setup phase and a server hook that runs before the method aggregates (`on_round`),
and runs beside any method it accepts.

    class FedProx(FedAvg):
        class Params(NoParams):
            mu: float = 0.01
        def loss_terms(self, ctx):
            return [Proximal(Proximal.Params(mu=self.params.mu), ctx)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedsim.data.tensors import LocalData

if TYPE_CHECKING:
    from fedsim.config import ClientSection, ExperimentConfig

Arrays = dict[str, np.ndarray]
Weighting = Literal["examples", "uniform"]  # how a client's output is weighted in the mean


class NoParams(BaseModel):
    """Parameters: none. Subclass it to declare a method's, an add-on's or a loss term's."""

    model_config = ConfigDict(extra="forbid")


class TrainPlan(BaseModel):
    """What one client is told for a round; a method subclasses it to tell more."""

    model_config = ConfigDict(extra="forbid")

    local_steps: int | None = None  # a straggler's reduced work (the system model's); None: planned


class ClientStore(Protocol):
    """One client's persistent state for one method, by name (kept between its rounds)."""

    def load(self, name: str) -> Arrays | None:
        ...

    def save(self, name: str, arrays: Arrays) -> None:
        ...


@dataclass
class ClientContext:
    """What a method's client half sees for one client in one round."""

    client_id: int
    server_round: int
    plan: TrainPlan
    global_arrays: dict[str, torch.Tensor]  # the received global model (its state dict)
    broadcast: dict[str, torch.Tensor]  # the arrays this method's `broadcast` sent
    store: ClientStore
    settings: ClientSection  # the experiment's local-training settings
    lr: float
    seed: int = 0  # the experiment's seed
    num_classes: int = 0
    steps: int = 0  # local steps taken, known after training
    num_examples: int = 0  # the examples it trained on (labelled), known after training
    model_factory: Callable[[], nn.Module] | None = None  # a fresh model of the run's architecture
    cache: dict[Any, Any] = field(default_factory=dict)  # per-process scratch for work that depends
    # only on its inputs (a speed-up in simulation; empty for every message when deployed)
    unlabeled: torch.Tensor | None = None  # the client's training inputs without labels (data.labels)
    labels: torch.Tensor | None = None  # its training labels, as it trains on them this round
    scratch: dict[str, Any] = field(default_factory=dict)  # what a component's `local_training`
    # hands to its `after_training` for this client and round


@dataclass
class Batch:
    """One training batch as a loss term sees it."""

    inputs: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor | None = None  # sensitive groups, when the dataset has them
    weights: torch.Tensor | None = None  # each row's share of the batch mean, when clients train
    # vectorized (short batches are padded to full ones: padding rows weigh 0); None: rows are equal


class LossTerm:
    """A term added to every batch's cross-entropy loss on a client (its `Params` checked before
    the run starts when it is named in `client.objectives`)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_groups: ClassVar[bool] = False  # reads the batch's sensitive groups
    per_client: ClassVar[tuple[str, ...] | None] = None  # attributes (dicts of tensors) that
    # differ per client, which vectorized training stacks; None: not declared, so clients with
    # this term train one by one (a term keeping other per-client data must leave it None)

    def __init__(self, params: BaseModel, ctx: ClientContext) -> None:
        self.params = params
        self.ctx = ctx

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


class StepShift(LossTerm):
    """A term that adds nothing to the loss but moves every local step a fixed distance: after
    the optimizer's update, each trainable parameter goes w <- w - lr * shift[name], outside the
    optimizer's momentum and Adam scaling (SCAFFOLD's drift correction as its reference code
    applies it). Subclasses set `shift` (one tensor per parameter name)."""

    per_client = ("shift",)
    shift: dict[str, torch.Tensor]


def split_shifts(terms: list[LossTerm]) -> tuple[list[LossTerm], list[StepShift]]:
    """A client's terms in two: those added to the loss, and the step shifts."""
    return ([t for t in terms if not isinstance(t, StepShift)],
            [t for t in terms if isinstance(t, StepShift)])


@dataclass
class ClientUpdate:
    """What a client half adds to its reply after training: output arrays and metrics."""

    outputs: dict[str, Arrays] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    pseudo_labels: tuple[np.ndarray, np.ndarray] | None = None  # (rows of ctx.unlabeled, the
    # label given to each, -1 for none): the simulator scores them against the hidden labels
    # (`pseudo_correct`) and sends only the score, never the labels


@dataclass
class ClientResult:
    """One client's reply: metrics (always), output arrays (unless pre-aggregated) and the
    per-client state its methods saved this round."""

    client_id: int
    metrics: dict[str, float]
    outputs: dict[str, Arrays] = field(default_factory=dict)
    state: dict[str, Arrays] = field(default_factory=dict)


@dataclass
class RoundResult:
    """A round's replies, unpacked: clients sorted by id, failures, and weighted mean outputs."""

    clients: list[ClientResult] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    means: dict[str, Arrays] = field(default_factory=dict)
    sums: dict[str, Arrays] = field(default_factory=dict)  # the weighted sums behind `means` (float64)
    weights: dict[str, float] = field(default_factory=dict)  # and their total weights
    skipped: dict[int, str] = field(default_factory=dict)  # sampled but dropped out or timed out
    notes: list[str] = field(default_factory=list)  # what workers say for the run's log

    def weighted_metric(self, name: str, weight: str = "num_examples") -> float:
        """Mean of a client metric weighted by another (NaN when no client reported it)."""
        pairs = [(c.metrics[name], c.metrics.get(weight, 1.0)) for c in self.clients
                 if name in c.metrics and np.isfinite(c.metrics[name])]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")

    def stacked(self, name: str, output: str = "model") -> np.ndarray:
        """Every client's `output` array `name`, stacked in client order (float64)."""
        return np.stack([c.outputs[output][name].astype(np.float64) for c in self.clients])


@dataclass
class RunInfo:
    """What the server half knows of the run: trainable parameter names, client sizes, the local
    training settings, the seed and how cohorts are sampled."""

    param_names: list[str]
    client_sizes: np.ndarray
    settings: ClientSection
    seed: int = 0
    cohort: int = 0  # clients sampled per round (Poisson sampling: expected)
    sampling: Literal["fixed", "poisson"] = "fixed"
    float_buffers: list[str] = field(default_factory=list)  # the model's float buffers (BatchNorm
    # statistics): computed from the clients' data, not trained

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)


class Component:
    """What methods and add-ons share: parameters, server state, broadcast and the client half."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_groups: ClassVar[bool] = False  # needs a dataset with a sensitive attribute

    def __init__(self, params: BaseModel | dict[str, Any] | None = None,
                 run: RunInfo | None = None) -> None:
        """`run` is given on the server; a worker builds the client half without it."""
        self.params = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})
        self.run = run
        self.state: Arrays = {}

    @classmethod
    def label(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Refuse, with a ConfigError naming the key, a spec this method cannot run correctly
        (called before anything runs; its parameters are already checked)."""

    # ---- server half ------------------------------------------------------------------------
    def save_state(self) -> Arrays:
        """All the server half carries between rounds, for a checkpoint: `self.state`."""
        return dict(self.state)

    def load_state(self, state: Arrays) -> None:
        """Continue from a checkpoint's `save_state()`."""
        self.state = dict(state)

    def broadcast(self, server_round: int, current: Arrays) -> Arrays:
        """Arrays every training message carries once for all its clients (a control variate)."""
        return {}

    # ---- client half ------------------------------------------------------------------------
    def training_data(self, ctx: ClientContext, data: LocalData) -> LocalData:
        """The data the client trains on this round (GGEUR tops its classes up)."""
        return data

    def loss_terms(self, ctx: ClientContext) -> list[LossTerm]:
        """Terms added to the loss of every local batch."""
        return []

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        """After local training: extra outputs and metrics to send, state to keep in ctx.store.
        What `model` holds afterwards is the model sent, unless an output named "model" replaces it."""
        return ClientUpdate()

    def local_training(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
                       steps: int | None, terms: list[LossTerm]) -> dict[str, float]:
        """Train `model` in place instead of the shared loop (example-level DP-SGD, the personal
        methods' schedules), returning what `clients.training.train_locally` returns; `terms` are
        the client's loss terms. Components that do not override it leave the shared loop (and
        training clients together) in place."""
        raise NotImplementedError

    @property
    def replaces_training(self) -> bool:
        return overrides(self, Component, "local_training")

    # ---- setup phase (once, before round 1) ---------------------------------------------------
    def client_setup(self, ctx: ClientContext, data: LocalData) -> Arrays:
        """What a client reports in the setup phase (GGEUR's class statistics)."""
        raise NotImplementedError

    def server_setup(self, reports: dict[int, Arrays]) -> dict[str, Any]:
        """Pool the clients' setup reports into `self.state`; returns a summary to record."""
        raise NotImplementedError

    @property
    def has_setup_phase(self) -> bool:
        return overrides(self, Component, "client_setup")


class Method(Component):
    """A federated method. The default is FedAvg: plain local training, sample-weighted mean."""

    Plan: ClassVar[type[TrainPlan]] = TrainPlan
    outputs: ClassVar[dict[str, Weighting]] = {"model": "examples"}  # what clients send back
    per_client_updates: ClassVar[bool] = False  # aggregate needs every client's outputs
    evaluates_global: ClassVar[bool] = False  # clients report the global model on their data first

    def plan(self, server_round: int, client_id: int, local_steps: int | None) -> TrainPlan:
        """What client `client_id` is told this round."""
        return self.Plan(local_steps=local_steps)

    def aggregate(self, server_round: int, current: Arrays,
                  result: RoundResult) -> tuple[Arrays, dict[str, float]]:
        """New global arrays and this method's metrics for the round."""
        return result.means["model"], {}

    # ---- personalization (client half, at evaluation) ------------------------------------------
    def personal_model(self, ctx: ClientContext, model: nn.Module, data: LocalData) -> bool:
        """Turn `model`, which holds the global model, into client `ctx.client_id`'s personal
        model in place (its own head, its local model, a head fine-tuned on its data), from what
        its training kept in `ctx.store`; False when the client has none yet (it has never
        trained), which leaves it out of the personal metrics. Methods that override it are
        evaluated per client on both models (`personal_*` metrics)."""
        raise NotImplementedError

    @property
    def personalizes(self) -> bool:
        return overrides(self, Method, "personal_model")


class AddOn(Component):
    """A technique that runs beside any method (configured in its own section)."""

    output_weighting: ClassVar[dict[str, Weighting]] = {}  # replaces the method's weighting of
    # these outputs (differential privacy weights every client's model equally)

    @classmethod
    def check_method(cls, method: type[Method]) -> None:
        """Refuse, with a ConfigError, a method this add-on cannot run beside."""

    def on_round(self, server_round: int, current: Arrays, result: RoundResult) -> dict[str, float]:
        """Server half, before the method aggregates: may change the round's `result` (its
        means); returns metrics for the round."""
        return {}


def overrides(obj: object, base: type, name: str) -> bool:
    """Whether `obj` (a class, or an instance of one) replaces `base`'s method `name`."""
    cls = obj if isinstance(obj, type) else type(obj)
    return getattr(cls, name) is not getattr(base, name)
