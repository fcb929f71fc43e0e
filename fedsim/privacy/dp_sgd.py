"""Example-level differential privacy: DP-SGD (Abadi et al., 2016) on every client, through
Opacus, beside any method that adds no loss term of its own.

Client: each local step draws a Poisson batch (every training example joins with probability
q = batch_size / n), Opacus computes the per-example gradients of the cross-entropy, clips each to
the L2 norm C, sums them, adds N(0, (z C)^2 I) and divides by the expected batch size q n; the
client's optimizer (SGD with momentum and weight decay, or Adam) takes that step. What the client
sends is then (epsilon, delta)-DP with respect to any one of its examples, whoever sees it.

Server: no change to aggregation. It counts each client's steps and reports, every round, the
largest epsilon over the clients at `delta`: client k has taken T_k steps of a Poisson-subsampled
Gaussian mechanism of rate q_k and noise multiplier z (the accountant of client-level DP, with the
client's examples in place of the clients).

The noise comes from the experiment seed (reproducible, recomputable from config.json) unless
`secure_randomness` seeds it from the operating system's entropy.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.augment import augment, draw_keys
from clients.training import make_optimizer
from fedsim.config import DpSgdSection, ExperimentConfig
from fedsim.data.tensors import LocalData
from fedsim.errors import ConfigError
from fedsim.method import AddOn, ClientContext, Method, RoundResult, RunInfo
from fedsim.models import BATCHNORM_MODELS
from fedsim.seeding import derive_seed
from fedsim.system import planned_steps

if TYPE_CHECKING:
    from fedsim.privacy.accountant import Accountant

DP_SGD_STREAM = 0xD95D


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The probability q that an example joins a step's Poisson batch."""
    return min(1.0, batch_size / num_examples) if num_examples else 0.0


class ExampleLevelDP(AddOn):
    """DP-SGD on the clients, epsilon per round on the server."""

    name = "dp_sgd"
    Params = DpSgdSection

    def __init__(self, params=None, run: RunInfo | None = None) -> None:
        super().__init__(params, run)
        if run is not None:
            self.state = {"steps": np.zeros(run.num_clients)}
            self.delta = self.params.delta or float(run.client_sizes.max()) ** -1.1
        self._accountants: dict[int, Accountant] = {}

    # ---- checks --------------------------------------------------------------------------
    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        if config.model.name in BATCHNORM_MODELS:
            raise ConfigError(f"dp_sgd.enabled with model.name = '{config.model.name}': BatchNorm mixes "
                              "the examples of a batch, so per-example gradients do not exist; use "
                              "'mlp', 'cnn' or 'logreg'")
        if config.client.objectives:
            raise ConfigError("dp_sgd.enabled with client.objectives: DP-SGD clips the per-example "
                              "gradients of the cross-entropy only; remove the objectives")
        for section, why in (("ggeur", "its setup phase sends class statistics without noise"),
                             ("fal", "its adversarial loss is not clipped per example"),
                             ("fedlabel", "its unlabelled model trains without DP-SGD")):
            if getattr(config, section).enabled:
                raise ConfigError(f"dp_sgd.enabled with {section}.enabled: {why}; switch one of them off")

    @classmethod
    def check_method(cls, method: type[Method]) -> None:
        if method.local_training is not Method.local_training:
            raise ConfigError(f"dp_sgd.enabled: strategy '{method.label()}' trains its clients its own "
                              "way (a personal schedule), which DP-SGD cannot replace; use a strategy "
                              "with plain local training or switch dp_sgd off")
        if method.loss_terms is not Method.loss_terms:
            raise ConfigError(f"dp_sgd.enabled: strategy '{method.label()}' adds loss terms to local "
                              "training, whose gradients DP-SGD does not clip per example; use a "
                              "strategy that trains on the cross-entropy alone (fedavg, fedavgm, fedadam, "
                              "fedyogi, fednova, qffl) or switch dp_sgd off")

    # ---- client half ---------------------------------------------------------------------
    def local_training(self, ctx: ClientContext, model: nn.Module, data: LocalData, seed: int,
                       steps: int | None, terms: list) -> dict[str, float]:
        """DP-SGD on a copy of `model` (Opacus' hooks stay off the resident model), then its
        weights copied into `model` (`terms`: none, `check` refuses them). Opacus is imported
        here: it takes seconds, and a deployed client starts a process for every message."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        started, p, settings = time.perf_counter(), self.params, ctx.settings
        n = len(data.y_train)
        steps = steps if steps is not None else planned_steps(n, settings)
        rate = sample_rate(n, settings.batch_size)
        private = copy.deepcopy(model)
        if errors := ModuleValidator.validate(private, strict=False):
            raise ValueError(f"dp_sgd: {errors[0]}")
        module = GradSampleModule(private, loss_reduction="mean")
        noise_seed = (int.from_bytes(os.urandom(8), "little") if p.secure_randomness
                      else derive_seed(seed, DP_SGD_STREAM))
        optimizer = DPOptimizer(make_optimizer(private, settings, ctx.lr, lean=False),
                                noise_multiplier=p.noise_multiplier, max_grad_norm=p.clip_norm,
                                expected_batch_size=max(1, round(rate * n)), loss_reduction="mean",
                                generator=torch.Generator(data.x_train.device).manual_seed(noise_seed))
        sampler = torch.Generator().manual_seed(seed)
        module.train()
        losses, sizes = [], []
        for step in range(steps if n else 0):
            chosen = (torch.rand(n, generator=sampler) < rate).nonzero().squeeze(1).to(data.x_train.device)
            inputs, targets = data.x_train[chosen], data.y_train[chosen]
            if settings.augment and len(chosen):
                keys = draw_keys(torch.tensor(seed, device=inputs.device), step, len(chosen))
                inputs = augment(inputs, keys, settings.augment)
            logits = module(inputs)
            loss = F.cross_entropy(logits, targets) if len(chosen) else logits.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # Opacus' hooks on a first layer whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            if len(chosen):
                losses.append(loss.item())
            sizes.append(len(chosen))
        module._close()
        with torch.no_grad():
            model.load_state_dict(private.state_dict())
        return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "num_examples": float(n),
                "steps": float(len(sizes)), "train_seconds": time.perf_counter() - started,
                "dp_sgd_batch_size": float(np.mean(sizes)) if sizes else 0.0}

    # ---- server half ---------------------------------------------------------------------
    def epsilon(self, num_examples: int, steps: int) -> float:
        """Epsilon at the run's delta of a client with `num_examples` examples after `steps` steps
        (one accountant per client size)."""
        from fedsim.privacy.accountant import Accountant, ClientSampling

        if num_examples not in self._accountants:
            batch = min(num_examples, self.run.settings.batch_size)
            examples = ClientSampling(num_examples, batch, "poisson")
            self._accountants[num_examples] = Accountant(self.params.noise_multiplier, examples, self.delta)
        return self._accountants[num_examples].epsilon(steps)

    def client_epsilon(self, client_id: int) -> float:
        """Epsilon of client `client_id`'s examples after its steps so far."""
        return self.epsilon(int(self.run.client_sizes[client_id]), int(self.state["steps"][client_id]))

    def on_round(self, server_round: int, current, result: RoundResult) -> dict[str, float]:
        for client in result.clients:
            self.state["steps"][client.client_id] += client.metrics.get("steps", 0.0)
        trained = np.flatnonzero(self.state["steps"])
        sizes, steps = self.run.client_sizes[trained], self.state["steps"][trained]
        # epsilon grows with the steps: per client size, the client with the most decides
        worst = max((self.epsilon(int(n), int(steps[sizes == n].max())) for n in np.unique(sizes)),
                    default=0.0)
        return {"dp_sgd_epsilon": worst, "dp_sgd_delta": self.delta}
