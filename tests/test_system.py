"""System heterogeneity: dropout, stragglers, speeds and the deadline, seeded and as configured."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.config import ClientSection, SystemSection
from fedsim.system import SystemModel, planned_steps

SIZES = np.full(1000, 64)
CLIENT = ClientSection(local_epochs=2, batch_size=16)  # 8 steps per client


def model(**settings) -> SystemModel:
    return SystemModel(SystemSection(**settings), SIZES, CLIENT, seed=3)


def test_no_heterogeneity_keeps_every_client_and_times_the_round_by_its_steps():
    outcome = model().round(1, list(range(50)))
    assert outcome.participants == list(range(50)) and not outcome.skipped
    assert outcome.simulated_seconds == pytest.approx(planned_steps(64, CLIENT) * 0.01)


def test_dropout_rate_and_reproducibility():
    system = model(dropout=0.3)
    cohort = list(range(1000))
    first, again = system.round(4, cohort), model(dropout=0.3).round(4, cohort)
    assert first.skipped == again.skipped
    assert len(first.skipped) / 1000 == pytest.approx(0.3, abs=0.05)
    assert set(first.skipped.values()) == {"dropped"}
    assert first.skipped != system.round(5, cohort).skipped  # a fresh draw every round


def test_stragglers_do_the_configured_share_of_their_steps():
    system = model(stragglers=0.2, straggler_work=0.25)
    assert system.stragglers.sum() == 200
    outcome = system.round(1, list(range(1000)))
    assert set(outcome.reduced_steps) == set(np.flatnonzero(system.stragglers))
    assert set(outcome.reduced_steps.values()) == {2}  # 25% of 8 steps


def test_deadline_times_out_the_slow_clients_and_caps_the_round():
    system = model(speed_sigma=1.0, deadline=0.08)
    outcome = system.round(1, list(range(1000)))
    slow = {cid for cid in range(1000) if 8 * 0.01 / system.speeds[cid] > 0.08}
    assert set(outcome.skipped) == slow and 0 < len(slow) < 1000
    assert outcome.simulated_seconds == pytest.approx(0.08)
