"""FedLabel (Cho, Joshi and Dimitriadis, "Local or Global: Selective Knowledge Assimilation for
Federated Learning with Limited Labels", ICCV 2023): clients hold a few labelled and many
unlabelled examples. Each round a client trains two models from the global one w and sends the
sum of their updates; nothing extra is communicated. An add-on, so it runs beside any
aggregation of models (the paper's is FedAvg).

1. The local expert w_L: the global model trained on the labelled data (the engine's ordinary
   local training, so it may run vectorized or in lockstep).
2. The unlabelled model w_U: the global model trained for as many steps on batches of
   `unlabeled_ratio` x `batch_size` unlabelled rows u. With the global model and w_L frozen,
   each scores its output s on the teachers' view of u by the confidence h(s) (the variance of
   the softmax vector, or its maximum); per row the more confident one is the expert s*, the
   other s-:

       y_hat = argmax s*,   kept = 1[max s* >= threshold],   agree = 1[argmax s- = y_hat]
       loss = mean over the rows of kept * (unlabeled_weight * CE(w_U(strong(u)), y_hat)
              + consistency * h(s-) / h(s*) * agree * KL(softmax(w_U(weak(u))) || s-))

3. The client sends w + (w_L - w) + (w_U - w), weighted by its labelled examples plus the
   unlabelled ones it kept at least once.

`teacher = "global"` (or `"local"`) makes one model the expert for every row: with
`consistency = 0`, "global" is FedAvg + FixMatch with the global model as teacher, and both are
the paper's only-global and only-local ablations. The README lists where the paper is silent
and what fedsim chose.

The hidden labels never reach this code: the client's unlabelled inputs arrive without them
(`ctx.unlabeled`), and the pseudo-labels it gives are scored by the simulator after training.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.augment import augment, draw_keys
from clients.training import make_optimizer
from fedsim.config import ExperimentConfig, FedLabelSection
from fedsim.errors import ConfigError
from fedsim.method import AddOn, ClientContext, ClientUpdate, Method, RoundResult, overrides
from fedsim.seeding import derive_seed

FEDLABEL_STREAM = 0xFED1AB


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode without gradients: a teacher."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def confidence(probabilities: torch.Tensor, measure: str) -> torch.Tensor:
    """Per row, how sure a softmax output is: its variance over the classes, or its maximum."""
    if measure == "variance":
        return probabilities.var(dim=1, unbiased=False)
    return probabilities.max(dim=1).values


def choose_experts(p_global: torch.Tensor, p_local: torch.Tensor, teacher: str, measure: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: whether the local model is the expert, the expert's output s*, the other's s-,
    and the weight h(s-) / h(s*) of the consistency term."""
    h_global, h_local = confidence(p_global, measure), confidence(p_local, measure)
    if teacher == "select":
        use_local = h_local > h_global
    else:
        use_local = torch.full_like(h_local, teacher == "local", dtype=torch.bool)
    pick = use_local[:, None]
    expert, other = torch.where(pick, p_local, p_global), torch.where(pick, p_global, p_local)
    h_expert, h_other = torch.where(use_local, h_local, h_global), torch.where(use_local, h_global, h_local)
    return use_local, expert, other, h_other / h_expert.clamp_min(1e-12)


class UnlabelledTraining:
    """Step 2 of the module docstring for one client in one round: w_U trained on pseudo-labels,
    keeping what it labelled for scoring."""

    def __init__(self, params: FedLabelSection, ctx: ClientContext, global_teacher: nn.Module,
                 local_teacher: nn.Module) -> None:
        self.params, self.ctx, self.unlabeled = params, ctx, ctx.unlabeled
        self.global_teacher, self.local_teacher = global_teacher, local_teacher
        seed = derive_seed(ctx.seed, ctx.server_round, ctx.client_id, FEDLABEL_STREAM)
        self.generator = torch.Generator().manual_seed(seed)
        self.key_seed = torch.tensor(seed % 2**31, device=self.unlabeled.device)
        images = self.unlabeled.dim() == 4
        self.weak = params.weak if params.weak is not None else []
        self.strong = params.strong if params.strong is not None else (
            ["flip", "crop", "cutout"] if images else ["noise"])
        if not images and {*self.weak, *self.strong} - {"noise"}:
            raise ValueError("fedlabel: flip, crop and cutout need image inputs (N, C, H, W); set "
                             "fedlabel.weak and fedlabel.strong to ['noise'] or [] for these inputs")
        self.order, self.position, self.step = torch.zeros(0, dtype=torch.long), 0, 0
        self.rows: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.from_local = 0

    def next_rows(self, count: int) -> torch.Tensor:
        """The next `count` unlabelled rows of reshuffled passes over them."""
        taken = []
        while count > 0:
            if self.position == len(self.order):
                self.order, self.position = torch.randperm(len(self.unlabeled), generator=self.generator), 0
            part = self.order[self.position:self.position + count]
            self.position += len(part)
            count -= len(part)
            taken.append(part)
        return torch.cat(taken)

    def view(self, inputs: torch.Tensor, kinds: list[str], noise_std: float, which: int) -> torch.Tensor:
        """An augmented view (`which` 0: the teachers', 1: the strong one) of the rows."""
        if image_kinds := [k for k in kinds if k != "noise"]:
            keys = draw_keys(self.key_seed, 2 * self.step + which, len(inputs))
            inputs = augment(inputs, keys, image_kinds)
        if "noise" in kinds:
            noise = torch.randn(inputs.shape, generator=self.generator).to(inputs.device)
            inputs = inputs + noise_std * noise
        return inputs

    def loss(self, student: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """The unlabelled loss of one step on `rows` of the unlabelled data."""
        p = self.params
        inputs = self.unlabeled[rows.to(self.unlabeled.device)]
        weak = self.view(inputs, self.weak, p.noise_std, 0)
        strong = self.view(inputs, self.strong, 2 * p.noise_std, 1)
        self.step += 1
        with torch.no_grad():
            p_global = torch.softmax(self.global_teacher(weak), dim=1)
            p_local = torch.softmax(self.local_teacher(weak), dim=1)
            use_local, expert, other, ratio = choose_experts(p_global, p_local, p.teacher, p.confidence)
            top, labels = expert.max(dim=1)
            kept = top >= p.threshold
            agree = other.argmax(dim=1) == labels
        self.rows.append(rows)
        self.labels.append(torch.where(kept, labels, -1).cpu())
        self.from_local += int((use_local & kept).sum())
        per_row = p.unlabeled_weight * F.cross_entropy(student(strong), labels, reduction="none")
        if p.consistency > 0:
            log_q = torch.log_softmax(student(weak), dim=1)
            kl = (log_q.exp() * (log_q - torch.log(other.clamp_min(1e-12)))).sum(dim=1)
            per_row = per_row + p.consistency * ratio * agree * kl
        return (per_row * kept).mean()

    def train(self, student: nn.Module, steps: int, batch_size: int) -> None:
        """`steps` SGD steps of `student` on the unlabelled loss."""
        optimizer = make_optimizer(student, self.ctx.settings, self.ctx.lr)
        student.train()
        for _ in range(steps if len(self.unlabeled) else 0):
            loss = self.loss(student, self.next_rows(self.params.unlabeled_ratio * batch_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def report(self) -> ClientUpdate:
        """What this client labelled this round: counts as metrics, the labels for scoring."""
        rows = torch.cat(self.rows).numpy() if self.rows else np.zeros(0, np.int64)
        labels = torch.cat(self.labels).numpy() if self.labels else np.zeros(0, np.int64)
        given = labels >= 0
        return ClientUpdate(metrics={"pseudo_drawn": float(len(rows)), "pseudo_labelled": float(given.sum()),
                                     "pseudo_from_local": float(self.from_local),
                                     "pseudo_kept_examples": float(len(np.unique(rows[given])))},
                            pseudo_labels=(rows, labels))


class FedLabel(AddOn):
    """The local expert, the unlabelled model taught by the more expert of it and the global
    model, and the sum of both updates (see the module docstring), beside any model-mean method."""

    name = "fedlabel"
    Params = FedLabelSection

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        if not config.data.labels.partial:
            raise ConfigError("fedlabel trains on unlabelled data: set data.labels.fraction below 1 "
                              "(e.g. 0.1 for 10% labels)")

    @classmethod
    def check_method(cls, method: type[Method]) -> None:
        if overrides(method, Method, "personal_model"):
            raise ConfigError(f"fedlabel: strategy '{method.label()}' keeps personal parameters "
                              "on its clients and sends only part of its model, which fedlabel's "
                              "sum of two updates would not match; switch one of them off")
        if set(method.outputs) != {"model"}:
            raise ConfigError(f"fedlabel: strategy '{method.label()}' sends more than the model "
                              "(e.g. control variates computed from it), which fedlabel's sum of two "
                              "updates would not match; use a model-mean strategy (fedavg, fedprox, "
                              "fedavgm, fedadam, fedyogi, moon, fedld, qffl) or switch fedlabel off")

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        """`model` holds the local expert; train the unlabelled model and put the sum of the two
        updates in its place: that is what is sent, and what later add-ons (privacy) see."""
        if ctx.unlabeled is None:
            raise ValueError("fedlabel: this client has no unlabelled data; set data.labels.fraction < 1")
        global_model = ctx.model_factory()
        global_model.load_state_dict(ctx.global_arrays)
        student = copy.deepcopy(global_model)
        training = UnlabelledTraining(self.params, ctx, frozen(global_model), frozen(copy.deepcopy(model)))
        training.train(student, ctx.steps, ctx.settings.batch_size)
        with torch.no_grad():
            trained = student.state_dict()
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    tensor.add_(trained[name] - ctx.global_arrays[name])
        update = training.report()
        update.metrics["num_examples"] = ctx.num_examples + update.metrics["pseudo_kept_examples"]
        return update

    def on_round(self, server_round: int, current, result: RoundResult) -> dict[str, float]:
        """The round's pseudo-labels over all its clients: accuracy (against the hidden labels),
        coverage (share of drawn rows labelled) and the local expert's share of them."""
        total = {k: sum(c.metrics.get(k, 0.0) for c in result.clients)
                 for k in ("pseudo_drawn", "pseudo_labelled", "pseudo_correct", "pseudo_from_local")}
        scored = all("pseudo_correct" in c.metrics for c in result.clients)
        labelled = total["pseudo_labelled"]
        drawn, nan = total["pseudo_drawn"], float("nan")
        return {"pseudo_label_accuracy": total["pseudo_correct"] / labelled if labelled and scored else nan,
                "pseudo_label_coverage": labelled / drawn if drawn else nan,
                "pseudo_local_share": total["pseudo_from_local"] / labelled if labelled else nan}
