"""Partitions of a training set over clients.

flwr-datasets' partitioners split a lightweight table (label, sensitive group, position) instead
of the data itself. Around them: quantity skew (client sizes drawn from a log-normal, a power law
or a Dirichlet), a global long tail applied before the split, and the two fairness splits of the
partial-information-decomposition paper generalized to K clients.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SizePartitioner,
)

from fedsim.config import SENSITIVE_KINDS, PartitionSection
from fedsim.errors import DataError


def label_table(labels: np.ndarray, groups: np.ndarray | None = None,
                clients: np.ndarray | None = None) -> Dataset:
    """The table the partitioners split: label, sensitive group (or 0), natural client (or 0) and
    position."""
    columns = {"label": labels.tolist(), "idx": np.arange(len(labels)).tolist()}
    for name, values in (("group", groups), ("client", clients)):
        columns[name] = (values if values is not None else np.zeros(len(labels), np.int64)).tolist()
    return Dataset.from_dict(columns)


def long_tail(labels: np.ndarray, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """Positions kept after imposing an exponential long tail on the class counts.

    Class c (in label order) keeps at most n_max * imbalance^(-c / (C - 1)) of its examples, chosen
    at random, so the largest class is `imbalance` times the smallest (the Fed-LT convention).
    """
    classes = np.unique(labels)
    if imbalance == 1.0 or len(classes) < 2:
        return np.arange(len(labels))
    n_max = np.bincount(labels).max()
    kept = []
    for rank, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        quota = max(1, int(n_max * imbalance ** (-rank / (len(classes) - 1))))
        kept.append(rng.permutation(members)[:quota] if len(members) > quota else members)
    return np.sort(np.concatenate(kept))


def quantity_sizes(total: int, num_clients: int, spec: PartitionSection,
                   rng: np.random.Generator) -> np.ndarray:
    """Client sizes summing to `total`, each >= min_size, the rest shared by random weights."""
    if spec.sizes == "lognormal":
        weights = rng.lognormal(0.0, spec.size_sigma, num_clients)
    elif spec.sizes == "powerlaw":
        weights = rng.pareto(spec.size_exponent, num_clients) + 1.0  # Pareto on [1, inf)
    else:
        weights = rng.dirichlet(np.full(num_clients, spec.size_alpha))
    spare = total - num_clients * spec.min_size
    shares = spare * weights / weights.sum()
    sizes = np.floor(shares).astype(np.int64)
    remainder = spare - sizes.sum()
    sizes[np.argsort(sizes - shares)[:remainder]] += 1  # largest remainders first
    return sizes + spec.min_size


class HalvesPartitioner(Partitioner):
    """Clients in two halves; an example goes to the first half with a probability given by its
    (group, label), then to a uniformly drawn client of its half.

    With two clients and `heterogeneity` this is the PID fairness paper's split (client 0 holds 92%
    of group 1 and 8% of group 0); with `synergy`, client 0 holds (z=0, y=0) and (z=1, y=1), a
    `swap_fraction` of examples crossing over.
    """

    def __init__(self, num_partitions: int, first_half_probability: np.ndarray, seed: int) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._probability = first_half_probability
        self._seed = seed
        self._assignment: np.ndarray | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _assign(self) -> np.ndarray:
        if self._assignment is None:
            rng = np.random.default_rng([self._seed, 0x4A1F])
            first = self._num_partitions // 2
            to_first = rng.random(len(self._probability)) < self._probability
            self._assignment = np.where(
                to_first, rng.integers(0, first, len(to_first)),
                rng.integers(first, self._num_partitions, len(to_first)))
        return self._assignment

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(np.flatnonzero(self._assign() == partition_id))


def _halves_probability(spec: PartitionSection, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    if spec.kind == "heterogeneity":
        return np.where(groups == 1, spec.majority_share, 1.0 - spec.majority_share)
    if len(np.unique(labels)) > 2 or len(np.unique(groups)) > 2:
        raise DataError("data.partition.kind = 'synergy' needs a binary label and a binary "
                        "sensitive attribute (adult or german)")
    return np.where(groups == labels, 1.0 - spec.swap_fraction, spec.swap_fraction)


def make_partitioner(spec: PartitionSection, num_clients: int, seed: int, labels: np.ndarray,
                     groups: np.ndarray | None) -> Partitioner:
    """The partitioner for `spec` over a table of these labels and groups."""
    rng = np.random.default_rng([seed, 0x512E])
    skewed_sizes = spec.sizes != "equal"
    sizes = quantity_sizes(len(labels), num_clients, spec, rng) if skewed_sizes else None
    if spec.kind == "iid":
        return SizePartitioner(sizes.tolist()) if skewed_sizes else IidPartitioner(num_clients)
    if spec.kind == "dirichlet" and skewed_sizes:
        return InnerDirichletPartitioner(sizes, partition_by="label", alpha=spec.alpha, seed=seed)
    if spec.kind in ("dirichlet", "sensitive"):
        return DirichletPartitioner(
            num_partitions=num_clients, partition_by="label" if spec.kind == "dirichlet" else "group",
            alpha=spec.alpha, min_partition_size=spec.min_size, self_balancing=spec.self_balancing,
            shuffle=True, seed=seed)
    if spec.kind == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            class_assignment_mode="first-deterministic", seed=seed)
    if spec.kind == "shards":
        return ShardPartitioner(num_partitions=num_clients, partition_by="label",
                                num_shards_per_partition=spec.shards_per_client, seed=seed)
    if spec.kind in ("heterogeneity", "synergy"):
        if num_clients < 2:
            raise DataError(f"data.partition.kind = '{spec.kind}' needs at least 2 clients")
        return HalvesPartitioner(num_clients, _halves_probability(spec, labels, groups), seed)
    raise DataError(f"data.partition.kind = '{spec.kind}' needs a dataset with natural clients "
                    "('synthetic', or a source with data.hf.client_column); use another kind here")


def natural_partitioner(table: Dataset, num_clients: int) -> Partitioner:
    """flwr-datasets' natural-id partitioner over `table`; its partition k is natural client k
    (it numbers the sorted ids, which are 0, 1, ... here)."""
    partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = table
    if num_clients > partitioner.num_partitions:
        raise DataError(f"the data have {partitioner.num_partitions} natural clients, fewer than "
                        f"data.num_clients = {num_clients}; lower it")
    return partitioner


def partition_labels(labels: np.ndarray, num_clients: int, spec: PartitionSection, seed: int,
                     groups: np.ndarray | None = None, clients: np.ndarray | None = None) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 over `num_clients` clients; returns sorted index arrays.

    `groups` holds each example's sensitive group (needed by the sensitive-attribute kinds),
    `clients` its natural client (kind `natural`: the first `num_clients` of them, in id order).
    Examples dropped by the long tail (or by shards' unequal remainder) belong to no client.
    """
    if spec.kind in SENSITIVE_KINDS and groups is None:
        raise DataError(f"data.partition.kind = '{spec.kind}' needs a dataset with a sensitive "
                        "attribute (adult or german)")
    kept = long_tail(labels, spec.imbalance, np.random.default_rng([seed, 0x7A11]))
    labels = labels[kept]
    groups = groups[kept] if groups is not None else None
    clients = clients[kept] if clients is not None else None
    if num_clients > len(labels) // spec.min_size:
        raise DataError(f"cannot give {num_clients} clients at least {spec.min_size} examples each "
                        f"from {len(labels)} examples; lower data.num_clients or data.partition.min_size")
    table = label_table(labels, groups, clients)
    if spec.kind == "iid":
        table = table.shuffle(seed=seed)
    if spec.kind == "natural" and clients is not None:
        partitioner = natural_partitioner(table, num_clients)
    else:
        partitioner = make_partitioner(spec, num_clients, seed, labels, groups)
        partitioner.dataset = table
    try:
        parts = [np.sort(kept[np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)])
                 for i in range(num_clients)]
    except ValueError as exc:
        raise DataError(f"partition {spec.kind} failed: {exc}; use fewer clients, a larger alpha "
                        "or a lower data.partition.min_size") from None
    smallest = int(np.argmin([len(p) for p in parts]))
    if len(parts[smallest]) < spec.min_size:
        raise DataError(
            f"partition {spec.kind} gave client {smallest} only {len(parts[smallest])} examples "
            f"(data.partition.min_size = {spec.min_size}); use fewer clients, a larger alpha or "
            "more classes/shards per client, or lower min_size")
    return parts
