"""FedLabel (Cho, Joshi and Dimitriadis, "Local or Global: Selective Knowledge Assimilation for
Federated Learning with Limited Labels", ICCV 2023): clients hold a few labelled and many
unlabelled examples. Each pseudo-labels its unlabelled data with whichever of its local and the
global model is more of an expert for the example, and pulls the model it trains towards the
local one where both models give the same label. Nothing extra is communicated. An add-on, so it
runs beside any aggregation (the paper's is FedAvg).

Per local step, beside the labelled batch of B examples, the client draws mu B unlabelled rows u
(reshuffled passes) and, with its teachers frozen:

    p_g = softmax(global(weak(u))),  p_l = softmax(local(weak(u)))
    teacher per row: the one with the larger max probability (`teacher = "select"`)
    y_hat = argmax of the teacher's p, kept when its max probability >= threshold
    loss += unlabeled_weight * mean over the mu B rows of 1[kept] CE(model(strong(u)), y_hat)
          + consistency * mean over the mu B rows of
              1[argmax p_l = argmax p_g] KL(p_l || softmax(model(weak(u))))

The local model is the client's own model at the end of its previous round of local training,
kept in client state; before a client's first round only the global model labels. With
`teacher = "global"` and `consistency = 0` this is FedAvg + FixMatch with the global model as
teacher, the baseline the paper compares with.

Choices where the paper's text was not at hand (recorded in the README): the confidence is the
maximum softmax probability; the KL runs from the local model's output to the trained model's on
the weak view; both unlabelled means are over all mu B rows (as FixMatch's); the strong view is
flip, crop and cutout for images (no RandAugment), Gaussian noise for other inputs.

The hidden labels never reach this code: the client's unlabelled inputs arrive without them
(`ctx.unlabeled`), and the pseudo-labels it gives are scored by the simulator after training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.augment import augment, draw_keys
from fedsim.config import ExperimentConfig, FedLabelSection
from fedsim.errors import ConfigError
from fedsim.method import AddOn, Batch, ClientContext, ClientUpdate, LossTerm, RoundResult
from fedsim.seeding import derive_seed

FEDLABEL_STREAM = 0xFED1AB
LOCAL_MODEL = "local"  # the client-state name of the local model


def frozen(model: nn.Module, arrays: dict[str, torch.Tensor]) -> nn.Module:
    """`model` holding `arrays`, in eval mode, without gradients: a teacher."""
    model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def pseudo_labels(p_global: torch.Tensor, p_local: torch.Tensor | None, teacher: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the label, its teacher's confidence (max probability) and whether the local
    model gave it."""
    confidence_g, label_g = p_global.max(dim=1)
    if p_local is None or teacher == "global":
        return label_g, confidence_g, torch.zeros_like(label_g, dtype=torch.bool)
    confidence_l, label_l = p_local.max(dim=1)
    use_local = (torch.ones_like(label_l, dtype=torch.bool) if teacher == "local"
                 else confidence_l > confidence_g)
    return (torch.where(use_local, label_l, label_g), torch.where(use_local, confidence_l, confidence_g),
            use_local)


class PseudoLabelLoss(LossTerm):
    """The unlabelled half of a client's loss: pseudo-labels on strong views and the global-local
    consistency (see the module docstring); it keeps what it labelled for scoring."""

    name = "pseudo_label"
    Params = FedLabelSection

    def __init__(self, params: FedLabelSection, ctx: ClientContext, global_teacher: nn.Module,
                 local_teacher: nn.Module | None) -> None:
        super().__init__(params, ctx)
        if ctx.unlabeled is None:
            raise ValueError("fedlabel: this client has no unlabelled data; set data.labels.fraction < 1")
        self.unlabeled = ctx.unlabeled
        self.global_teacher, self.local_teacher = global_teacher, local_teacher
        seed = derive_seed(ctx.seed, ctx.server_round, ctx.client_id, FEDLABEL_STREAM)
        self.generator = torch.Generator().manual_seed(seed)
        self.key_seed = torch.tensor(seed % 2**31, device=self.unlabeled.device)
        images = self.unlabeled.dim() == 4
        self.weak = params.weak if params.weak is not None else (["flip", "crop"] if images else ["noise"])
        self.strong = params.strong if params.strong is not None else (
            ["flip", "crop", "cutout"] if images else ["noise"])
        if not images and {*self.weak, *self.strong} - {"noise"}:
            raise ValueError("fedlabel: flip, crop and cutout need image inputs (N, C, H, W); set "
                             "fedlabel.weak and fedlabel.strong to ['noise'] for these inputs")
        self.order = torch.zeros(0, dtype=torch.long)
        self.position = 0
        self.step = 0
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
        """An augmented view (`which` 0: weak, 1: strong) of the unlabelled rows."""
        if image_kinds := [k for k in kinds if k != "noise"]:
            keys = draw_keys(self.key_seed, 2 * self.step + which, len(inputs))
            inputs = augment(inputs, keys, image_kinds)
        if "noise" in kinds:
            noise = torch.randn(inputs.shape, generator=self.generator).to(inputs.device)
            inputs = inputs + noise_std * noise
        return inputs

    def penalty(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        p = self.params
        if len(self.unlabeled) == 0:
            return batch.logits.new_zeros(())
        rows = self.next_rows(p.unlabeled_ratio * len(batch.targets))
        inputs = self.unlabeled[rows.to(self.unlabeled.device)]
        weak = self.view(inputs, self.weak, p.noise_std, 0)
        strong = self.view(inputs, self.strong, 2 * p.noise_std, 1)
        self.step += 1
        with torch.no_grad():
            p_global = torch.softmax(self.global_teacher(weak), dim=1)
            p_local = None if self.local_teacher is None else torch.softmax(self.local_teacher(weak), dim=1)
            labels, confidence, use_local = pseudo_labels(p_global, p_local, p.teacher)
            kept = confidence >= p.threshold
        self.rows.append(rows)
        self.labels.append(torch.where(kept, labels, -1).cpu())
        self.from_local += int((use_local & kept).sum())
        loss = batch.logits.new_zeros(())
        if p.unlabeled_weight > 0 and kept.any():
            per_row = F.cross_entropy(model(strong), labels, reduction="none")
            loss = loss + p.unlabeled_weight * (per_row * kept).mean()
        if p.consistency > 0 and p_local is not None:
            agree = p_local.argmax(dim=1) == p_global.argmax(dim=1)
            if agree.any():
                log_q = torch.log_softmax(model(weak), dim=1)
                kl = (p_local * (torch.log(p_local.clamp_min(1e-12)) - log_q)).sum(dim=1)
                loss = loss + p.consistency * (kl * agree).mean()
        return loss

    def report(self) -> ClientUpdate:
        """What this client labelled this round: counts as metrics, the labels for scoring."""
        rows = torch.cat(self.rows).numpy() if self.rows else np.zeros(0, np.int64)
        labels = torch.cat(self.labels).numpy() if self.labels else np.zeros(0, np.int64)
        labelled = float((labels >= 0).sum())
        return ClientUpdate(metrics={"pseudo_drawn": float(len(rows)), "pseudo_labelled": labelled,
                                     "pseudo_from_local": float(self.from_local)},
                            pseudo_labels=(rows, labels))


class FedLabel(AddOn):
    """Pseudo-labels from the local or the global model, and their consistency, beside any method."""

    name = "fedlabel"
    Params = FedLabelSection

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        self.terms: dict[int, PseudoLabelLoss] = {}  # this message's clients' terms, by client id

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        if not config.data.labels.partial:
            raise ConfigError("fedlabel trains on unlabelled data: set data.labels.fraction below 1 "
                              "(e.g. 0.1 for 10% labels)")

    @property
    def keeps_local_model(self) -> bool:
        return self.params.teacher != "global" or self.params.consistency > 0

    def loss_terms(self, ctx: ClientContext) -> list[LossTerm]:
        global_teacher = frozen(ctx.model_factory(), ctx.global_arrays)
        stored = ctx.store.load(LOCAL_MODEL) if self.keeps_local_model else None
        local_teacher = None if stored is None else frozen(ctx.model_factory(), stored)
        term = PseudoLabelLoss(self.params, ctx, global_teacher, local_teacher)
        self.terms[ctx.client_id] = term
        return [term]

    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        if self.keeps_local_model:
            ctx.store.save(LOCAL_MODEL, {k: v.detach().cpu().numpy().copy()
                                         for k, v in model.state_dict().items()})
        return self.terms.pop(ctx.client_id).report()

    def on_round(self, server_round: int, current, result: RoundResult) -> dict[str, float]:
        """The round's pseudo-labels over all its clients: accuracy (against the hidden labels),
        coverage (share of drawn rows labelled) and the local model's share of them."""
        total = {k: sum(c.metrics.get(k, 0.0) for c in result.clients)
                 for k in ("pseudo_drawn", "pseudo_labelled", "pseudo_correct", "pseudo_from_local")}
        scored = all("pseudo_correct" in c.metrics for c in result.clients)
        labelled = total["pseudo_labelled"]
        drawn, nan = total["pseudo_drawn"], float("nan")
        return {"pseudo_label_accuracy": total["pseudo_correct"] / labelled if labelled and scored else nan,
                "pseudo_label_coverage": labelled / drawn if drawn else nan,
                "pseudo_local_share": total["pseudo_from_local"] / labelled if labelled else nan}
