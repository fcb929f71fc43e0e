"""Epsilon of a run's client-level Gaussian mechanism after each round, from dp-accounting.

Every round releases the noised sum of the sampled clients' clipped updates, a subsampled
Gaussian mechanism; T rounds compose it T times.
- Poisson sampling (each client joins with probability q): add-or-remove-one adjacency, noise
  multiplier z (the sum changes by at most the clip norm when one client is added).
- Fixed-size cohorts (m of N drawn without replacement): N is public, so adjacency is
  replace-one, under which the sum changes by up to twice the clip norm: noise multiplier z / 2
  (Wang, Balle & Kasiviswanathan, 2019, the bound dp-accounting implements).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

Sampling = Literal["fixed", "poisson"]


@dataclass(frozen=True)
class ClientSampling:
    """How clients are sampled per round: N clients, cohorts of `cohort` (Poisson: expected)."""

    num_clients: int
    cohort: int
    sampling: Sampling

    @property
    def rate(self) -> float:
        return self.cohort / self.num_clients


def round_event(noise_multiplier: float, clients: ClientSampling) -> dp_accounting.DpEvent:
    """The DP event of one round (see the module docstring for the two adjacencies)."""
    if clients.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            clients.rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SampledWithoutReplacementDpEvent(
        clients.num_clients, clients.cohort, dp_accounting.GaussianDpEvent(noise_multiplier / 2))


class Accountant:
    """Epsilon at `delta` after any number of rounds of one run's mechanism. RDP composes by
    addition, so one round's RDP curve is computed once; the PLD ledger composes the rounds it
    has not seen yet."""

    def __init__(self, noise_multiplier: float, clients: ClientSampling, delta: float,
                 kind: Literal["rdp", "pld"] = "rdp") -> None:
        if kind == "pld" and clients.sampling != "poisson":
            raise ValueError("the PLD accountant is used for Poisson sampling only")
        self.noise_multiplier, self.clients, self.delta, self.kind = noise_multiplier, clients, delta, kind
        self.event = round_event(noise_multiplier, clients) if noise_multiplier > 0 else None
        self._ledger: RdpAccountant | PLDAccountant | None = None
        self._composed = 0

    def _one_round_rdp(self) -> RdpAccountant:
        relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if self.clients.sampling == "poisson"
                    else dp_accounting.NeighboringRelation.REPLACE_ONE)
        ledger = RdpAccountant(neighboring_relation=relation)
        ledger.compose(self.event)
        return ledger

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds (inf without noise, 0 before the first)."""
        if self.event is None:
            return float("inf")
        if rounds == 0:
            return 0.0
        absl = logging.getLogger("absl")  # it warns of each RDP order it drops as non-convergent
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            if self.kind == "rdp":
                self._ledger = self._ledger or self._one_round_rdp()
                return float(compute_epsilon(self._ledger.orders, rounds * self._ledger.rdp, self.delta)[0])
            if self._ledger is None or rounds < self._composed:
                self._ledger, self._composed = PLDAccountant(), 0
            self._ledger.compose(self.event, rounds - self._composed)
            self._composed = rounds
            return float(self._ledger.get_epsilon(self.delta))
        finally:
            absl.setLevel(level)


def epsilon(noise_multiplier: float, clients: ClientSampling, rounds: int, delta: float,
            kind: Literal["rdp", "pld"] = "rdp") -> float:
    """Epsilon at `delta` after `rounds` rounds of noise multiplier `noise_multiplier`."""
    return Accountant(noise_multiplier, clients, delta, kind).epsilon(rounds)
