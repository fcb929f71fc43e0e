"""Label-based partitions of a training set over clients, through flwr-datasets' partitioners."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedsim.config import PartitionSection
from fedsim.errors import DataError


def _label_table(labels: np.ndarray) -> Dataset:
    """A lightweight table (label, position) the partitioners split instead of the data itself."""
    return Dataset.from_dict({"label": labels.tolist(), "idx": np.arange(len(labels)).tolist()})


def _partitioner(spec: PartitionSection, num_clients: int, seed: int) -> Partitioner:
    if spec.kind == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if spec.kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=spec.min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    raise DataError(
        f"data.partition.kind = '{spec.kind}' needs a dataset with natural clients "
        "(e.g. 'synthetic'); use 'iid' or 'dirichlet' here"
    )


def partition_labels(
    labels: np.ndarray, num_clients: int, spec: PartitionSection, seed: int
) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 over `num_clients` clients; returns sorted index arrays."""
    if num_clients > len(labels) // spec.min_size:
        raise DataError(
            f"cannot give {num_clients} clients at least {spec.min_size} examples each from "
            f"{len(labels)} examples; lower data.num_clients or data.partition.min_size"
        )
    table = _label_table(labels)
    if spec.kind == "iid":
        table = table.shuffle(seed=seed)
    partitioner = _partitioner(spec, num_clients, seed)
    partitioner.dataset = table
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
                 for i in range(num_clients)]
    except ValueError as exc:
        raise DataError(f"partition {spec.kind} failed: {exc}") from None
    return parts
