"""System heterogeneity: which sampled clients drop out, straggle or miss the deadline, and a
simulated wall clock per round. Everything is a pure function of (seed, round, client id)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedsim.config import ClientSection, SystemSection
from fedsim.seeding import derive_seed

SYSTEM_STREAM = 0x5757


def planned_steps(num_examples: int, settings: ClientSection) -> int:
    """Local steps: `local_steps` if set, else local_epochs passes of ceil(n / batch) batches."""
    if settings.local_steps is not None:
        return settings.local_steps
    return settings.local_epochs * math.ceil(num_examples / settings.batch_size)


@dataclass
class RoundSystem:
    """One round's system outcome for the sampled cohort."""

    participants: list[int]
    skipped: dict[int, str] = field(default_factory=dict)  # client id -> "dropped" / "timed out"
    reduced_steps: dict[int, int] = field(default_factory=dict)  # stragglers' local steps
    simulated_seconds: float = 0.0  # the round's duration: its slowest awaited client


class SystemModel:
    """Fixed per-client speeds and straggler set; per-round dropout and deadline."""

    def __init__(self, spec: SystemSection, client_sizes: np.ndarray, client: ClientSection,
                 seed: int) -> None:
        self.spec = spec
        self.client = client
        self.client_sizes = np.asarray(client_sizes)
        self.seed = seed
        rng = np.random.default_rng([seed, SYSTEM_STREAM])
        n = len(self.client_sizes)
        self.speeds = rng.lognormal(0.0, spec.speed_sigma, n) if spec.speed_sigma > 0 else np.ones(n)
        self.stragglers = np.zeros(n, dtype=bool)
        self.stragglers[rng.choice(n, int(round(spec.stragglers * n)), replace=False)] = True

    def steps(self, client_id: int) -> int:
        full = planned_steps(int(self.client_sizes[client_id]), self.client)
        if self.stragglers[client_id]:
            return max(1, int(full * self.spec.straggler_work))
        return full

    def round(self, server_round: int, cohort: list[int]) -> RoundSystem:
        """Apply dropout, straggling and the deadline to a sampled cohort."""
        rng = np.random.default_rng(derive_seed(self.seed, server_round, SYSTEM_STREAM))
        drops = rng.random(len(cohort)) < self.spec.dropout
        outcome = RoundSystem(participants=[])
        durations = []
        for cid, dropped in zip(cohort, drops, strict=True):
            if dropped:
                outcome.skipped[cid] = "dropped"
                continue
            steps = self.steps(cid)
            seconds = steps * self.spec.step_seconds / self.speeds[cid]
            if self.spec.deadline is not None and seconds > self.spec.deadline:
                outcome.skipped[cid] = "timed out"
                durations.append(self.spec.deadline)
                continue
            if self.stragglers[cid]:
                outcome.reduced_steps[cid] = steps
            outcome.participants.append(cid)
            durations.append(seconds)
        outcome.simulated_seconds = float(max(durations, default=0.0))
        return outcome
