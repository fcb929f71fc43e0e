"""Client-level differential privacy, DP-FedAvg (McMahan et al., 2018) with optional adaptive
clipping (Andrew et al., 2021): both halves in one add-on, beside any method whose aggregate is
a mean of the clients' models.

Client: the update D = trained - global over every float array of the model is scaled into the
L2 ball of the round's clip norm C; the model it sends is global + clipped D (integer buffers
keep the global's value; models with float buffers, such as BatchNorm statistics, are refused).
It also reports its update's norm and b = 1[|D| <= C].

Server: the method sees the mean  global + (sum of clipped D + N(0, (z_D C)^2 I)) / n  instead
of the plain one, every client weighted equally, where n is the number of replies for
fixed-size cohorts and the expected cohort q N for Poisson sampling (the fixed denominator of
the DP-FedAvg estimator). Fixed clipping: z_D = z. Adaptive: the server also noises the clipped
count, sum(b - 1/2) + N(0, s^2), divides it by n and moves C geometrically towards the target
quantile g, C <- C exp(-lr (b_mean - g)); z_D = (z^-2 - (2 s)^-2)^(-1/2), so that both queries together are
one Gaussian mechanism of noise multiplier z, the one the accountant is given.

Threat model: a trusted server adds the noise (central DP). What the run releases, the global
models, is (epsilon, delta)-DP at the client level when the noise and the cohorts are secret:
`privacy.secure_randomness` draws them from the operating system's entropy; by default they come
from the experiment seed, reproducible but recomputable from config.json (fine for studying
utility, not for a guarantee). The per-client diagnostics the simulator records (train_loss,
update norms in clients.parquet, a method's client state in checkpoints) are the server's own
and are not noised.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from fedsim.config import ExperimentConfig, PrivacySection
from fedsim.engine.cohort import cohort_size
from fedsim.errors import ConfigError
from fedsim.method import (
    AddOn,
    Arrays,
    ClientContext,
    ClientUpdate,
    Method,
    RoundResult,
    RunInfo,
    Weighting,
    overrides,
)
from fedsim.models import BATCHNORM_MODELS
from fedsim.seeding import derive_seed

if TYPE_CHECKING:
    from fedsim.privacy.accountant import Accountant

DP_STREAM = 0xD1FF


def clipped_update(trained: dict[str, torch.Tensor], global_arrays: dict[str, torch.Tensor],
                   clip_norm: float) -> tuple[Arrays, float]:
    """global + the update scaled into the clip-norm ball, as numpy arrays, and the update's
    norm before clipping (over every float array together)."""
    deltas = {k: (v.detach().double() - global_arrays[k].double()) for k, v in trained.items()
              if v.is_floating_point()}
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, value in trained.items():
        base = global_arrays[key]
        new = base.double() + deltas[key] * scale if key in deltas else base
        out[key] = new.to(value.dtype).cpu().numpy().copy()
    return out, norm


def update_noise_multiplier(p: PrivacySection, count_stddev: float) -> float:
    """The noise multiplier of the update query: z itself, or with adaptive clipping what is left
    of z once the clipped-count query (std `count_stddev`, sensitivity 1/2) has its share."""
    if not p.adaptive or p.noise_multiplier == 0:
        return p.noise_multiplier
    return (p.noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


class ClientLevelDP(AddOn):
    """Clip on the clients, noise on the server, epsilon every round."""

    name = "privacy"
    Params = PrivacySection
    output_weighting: ClassVar[dict[str, Weighting]] = {"model": "uniform"}

    # ---- checks --------------------------------------------------------------------------
    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        p = config.privacy
        if config.evaluation.decomposition:
            raise ConfigError("privacy.enabled with evaluation.decomposition: the decomposition "
                              "evaluates every client's own model and records it; switch one off")
        if config.model.name in BATCHNORM_MODELS:
            raise ConfigError(f"privacy.enabled with model.name = '{config.model.name}': its BatchNorm "
                              "statistics are computed from the clients' data and would need noise too "
                              "(a noised variance can turn negative); use 'mlp', 'cnn' or 'logreg'")
        if config.ggeur.enabled:
            raise ConfigError("privacy.enabled with ggeur.enabled: GGEUR's setup phase sends each "
                              "client's class statistics without noise; switch one of them off")
        if p.accountant == "pld" and config.strategy.sampling != "poisson":
            raise ConfigError("privacy.accountant = 'pld' accounts Poisson sampling only: set "
                              "strategy.sampling = 'poisson', or privacy.accountant = 'rdp'")
        stddev = count_stddev(p, cohort_size(config, config.data.num_clients))
        if p.adaptive and p.noise_multiplier > 0 and p.noise_multiplier >= 2 * stddev:
            raise ConfigError(
                f"privacy.noise_multiplier = {p.noise_multiplier} leaves no noise for the updates: "
                f"with adaptive clipping it must be below 2 x privacy.clipped_count_stddev "
                f"(= {2 * stddev:g}); raise privacy.clipped_count_stddev or the cohort size")

    @classmethod
    def check_method(cls, method: type[Method]) -> None:
        if overrides(method, Method, "personal_model"):
            raise ConfigError(f"privacy.enabled: strategy '{method.label()}' keeps personal "
                              "parameters on its clients, which client-level DP would clip and send "
                              "with the model; use a strategy without personal models or switch "
                              "privacy off")
        if method.per_client_updates or set(method.outputs) != {"model"}:
            raise ConfigError(
                f"privacy.enabled: strategy '{method.label()}' aggregates more than a mean of the "
                "clients' models (it reads each client's update, or extra outputs), which client-"
                "level DP does not cover; use a mean-based strategy (fedavg, fedprox, fedavgm, "
                "fedadam, fedyogi, moon) or switch privacy off")

    def __init__(self, params=None, run: RunInfo | None = None) -> None:
        super().__init__(params, run)
        if run is not None and run.float_buffers:
            names = ", ".join(run.float_buffers[:3])
            raise ConfigError(f"privacy.enabled: the model has float buffers ({names}) "
                              "computed from the clients' data, which client-level DP would have to "
                              "noise; use a model without them (no BatchNorm)")

    # ---- server half -----------------------------------------------------------------------
    @property
    def clip_norm(self) -> float:
        """This round's clip norm (adaptive clipping keeps it in `self.state`)."""
        return float(self.state.get("clip_norm", [self.params.clip_norm])[0])

    @cached_property
    def accountant(self) -> Accountant:
        """The run's accountant (imported here, on the server only: dp-accounting takes seconds
        to import, and a deployed client starts a new process for every message)."""
        from fedsim.privacy.accountant import Accountant, ClientSampling

        p, run = self.params, self.run
        sampling = ClientSampling(run.num_clients, run.cohort, run.sampling)
        return Accountant(p.noise_multiplier, sampling, p.delta or run.num_clients ** -1.1, p.accountant)

    def broadcast(self, server_round: int, current: Arrays) -> Arrays:
        return {"clip_norm": np.array([self.clip_norm])}

    def on_round(self, server_round: int, current: Arrays, result: RoundResult) -> dict[str, float]:
        """Replace the round's model mean by its noised, equally weighted version; adapt the clip
        norm; the round's epsilon."""
        p, clip, cohort = self.params, self.clip_norm, self.run.cohort
        denominator = cohort if self.run.sampling == "poisson" else len(result.clients)
        stddev = count_stddev(p, cohort)
        sigma = update_noise_multiplier(p, stddev) * clip if denominator > 0 else 0.0
        rng = np.random.default_rng(None if p.secure_randomness
                                    else derive_seed(self.run.seed, server_round, DP_STREAM))
        if denominator > 0:
            total, count = result.sums.get("model"), result.weights.get("model", 0.0)
            mean = {}
            for name, base in current.items():
                if not np.issubdtype(base.dtype, np.floating):
                    mean[name] = base
                    continue
                update = (total[name] - count * base.astype(np.float64)) if total is not None else 0.0
                noised = update + rng.normal(0.0, sigma, base.shape)
                mean[name] = (base.astype(np.float64) + noised / denominator).astype(base.dtype)
            result.means["model"] = mean
        metrics = {"dp_clip_norm": clip, "dp_noise_std": sigma / max(denominator, 1),
                   "dp_epsilon": self.accountant.epsilon(server_round)}
        if p.adaptive and denominator > 0:
            within = sum(c.metrics["dp_within_clip"] - 0.5 for c in result.clients)
            share = (within + rng.normal(0.0, stddev)) / denominator + 0.5
            self.state["clip_norm"] = np.array([clip * math.exp(-p.clip_lr * (share - p.target_quantile))])
            metrics["dp_unclipped_share"] = share
        return metrics

    # ---- client half -------------------------------------------------------------------------
    @torch.no_grad()
    def after_training(self, ctx: ClientContext, model: nn.Module) -> ClientUpdate:
        clip = float(ctx.broadcast["clip_norm"][0])
        sent, norm = clipped_update(model.state_dict(), ctx.global_arrays, clip)
        return ClientUpdate(outputs={"model": sent},
                            metrics={"dp_update_norm": norm, "dp_within_clip": float(norm <= clip)})


def count_stddev(p: PrivacySection, cohort: int) -> float:
    """The clipped-count noise std: privacy.clipped_count_stddev, or the cohort size / 20."""
    return p.clipped_count_stddev or cohort / 20
