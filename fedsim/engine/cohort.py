"""Who takes part in a round: seeded cohort sampling over virtual client ids, the system model
(dropout, stragglers, deadline), and, when deployed, only the clients whose node is online."""

from __future__ import annotations

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.errors import FedsimError
from fedsim.seeding import derive_seed
from fedsim.system import RoundSystem, SystemModel

SAMPLE_STREAM, EVAL_STREAM = 0x5A3B1E, 0xE7A1


def cohort_size(config: ExperimentConfig, num_clients: int) -> int:
    """Clients sampled per round: strategy.fraction of them, or strategy.clients_per_round."""
    s = config.strategy
    k = round(s.fraction * num_clients) if s.fraction else s.clients_per_round
    return max(1, min(int(k or num_clients), num_clients))


class CohortSampler:
    """Samples each round's training and evaluation cohorts from their own seeded streams."""

    def __init__(self, config: ExperimentConfig, client_sizes: np.ndarray) -> None:
        self.config = config
        self.client_sizes = np.asarray(client_sizes)
        self.seed = config.experiment.seed
        self.system = SystemModel(config.system, self.client_sizes, config.client, self.seed)
        self.available: list[int] | None = None  # deployed: clients whose node is online

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    def population(self) -> np.ndarray:
        """The clients that can be sampled: all of them, or (deployed) those online."""
        if self.available is None:
            return np.arange(self.num_clients)
        return np.asarray(self.available, dtype=np.int64)

    def set_online(self, clients: list[int]) -> None:
        """Deployed: only `clients` can be sampled; fewer than strategy.min_available_clients
        stop the run."""
        self.available = sorted(clients)
        needed = self.config.strategy.min_available_clients
        if len(self.available) < needed:
            raise FedsimError(f"only {len(self.available)} clients' nodes are online, fewer than "
                              f"strategy.min_available_clients = {needed}: stopping the run")

    def sample_cohort(self, server_round: int) -> list[int]:
        """This round's clients, from the round's own seeded stream: the cohort size drawn without
        replacement, or (strategy.sampling = 'poisson') each client independently with
        probability cohort size / num_clients. With privacy.secure_randomness, from the operating
        system's entropy instead."""
        privacy = self.config.privacy
        secret = privacy.enabled and privacy.secure_randomness
        rng = np.random.default_rng(None if secret else derive_seed(self.seed, server_round, SAMPLE_STREAM))
        population = self.population()
        size = cohort_size(self.config, self.num_clients)
        if self.config.strategy.sampling == "poisson":
            return [int(c) for c in population[rng.random(len(population)) < size / self.num_clients]]
        return sorted(int(c) for c in rng.choice(population, min(size, len(population)), replace=False))

    def train_round(self, server_round: int) -> RoundSystem:
        """The sampled clients that take part once dropout and the deadline have struck."""
        return self.system.round(server_round, self.sample_cohort(server_round))

    def evaluation_cohort(self, server_round: int) -> list[int]:
        fraction = self.config.evaluation.client_fraction
        population = self.population()
        k = min(int(round(fraction * self.num_clients)), len(population))
        if k == 0:
            return []
        rng = np.random.default_rng(derive_seed(self.seed, server_round, EVAL_STREAM))
        return sorted(int(c) for c in rng.choice(population, k, replace=False))
