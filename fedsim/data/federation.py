"""The federation: N virtual clients, each a (train, test) split, plus the global test set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from fedsim.config import DataSection, LabelsSection
from fedsim.data.arrays import ArrayDataset, stratified_split_indices
from fedsim.data.embedding import embed
from fedsim.data.features import apply_feature_skew
from fedsim.data.sources import load_source
from fedsim.data.synthetic import SyntheticClients
from fedsim.errors import DataError


@dataclass(frozen=True)
class ClientData:
    """One client's local data (numpy arrays)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    z_train: np.ndarray | None = None  # sensitive group per example, when the dataset has one
    z_test: np.ndarray | None = None
    x_unlabeled: np.ndarray | None = None  # training inputs whose labels are hidden (data.labels)


class IndexedFederation:
    """Clients as index arrays into one dataset's training arrays (held once per process)."""

    def __init__(self, dataset: ArrayDataset, train_idx: list[np.ndarray],
                 test_idx: list[np.ndarray], test_domain: np.ndarray | None = None,
                 unlabeled_idx: list[np.ndarray] | None = None) -> None:
        self.dataset = dataset
        self.train_idx = train_idx  # the labelled training rows of each client
        self.test_idx = test_idx
        self.unlabeled_idx = unlabeled_idx  # its training rows without labels (data.labels), or None
        self.test_domain = test_domain  # feature skew: the domain of each global test example
        self.num_clients = len(train_idx)
        self.num_classes = dataset.num_classes
        self.input_shape = dataset.input_shape
        self.train_sizes = np.array([len(i) for i in train_idx], dtype=np.int64)

    def client_data(self, client_id: int) -> ClientData:
        x, y = self.dataset.x_train, self.dataset.y_train
        train, test = self.train_idx[client_id], self.test_idx[client_id]
        unlabeled = None if self.unlabeled_idx is None else x[self.unlabeled_idx[client_id]]
        return ClientData(x[train], y[train], x[test], y[test], *self.client_groups(client_id),
                          x_unlabeled=unlabeled)

    def hidden_labels(self, client_id: int) -> np.ndarray | None:
        """The true labels of the client's unlabelled rows, which only the simulator reads (to
        score pseudo-labels); training code never receives them."""
        return None if self.unlabeled_idx is None else self.dataset.y_train[self.unlabeled_idx[client_id]]

    def client_groups(self, client_id: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The sensitive group of each of the client's (train, test) examples, or (None, None)."""
        z = self.dataset.sensitive_train
        if z is None:
            return None, None
        return z[self.train_idx[client_id]], z[self.test_idx[client_id]]

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.x_test, self.dataset.y_test


class NaturalFederation:
    """Clients that generate their own data (Synthetic); a small per-process cache of clients."""

    def __init__(self, clients: SyntheticClients, client_test_fraction: float,
                 eval_clients: int) -> None:
        self.clients = clients
        self.client_test_fraction = client_test_fraction
        self.num_clients = clients.num_clients
        self.num_classes = clients.spec.num_classes
        self.input_shape = (clients.spec.dim,)
        self.train_sizes = clients.sizes - np.round(clients.sizes * client_test_fraction).astype(
            np.int64)
        self.eval_clients = min(eval_clients, self.num_clients)
        self.client_data = lru_cache(maxsize=4096)(self._client_data)

    def _client_data(self, client_id: int) -> ClientData:
        x, y = self.clients.generate(client_id)
        n_test = int(round(len(y) * self.client_test_fraction))
        return ClientData(x[n_test:], y[n_test:], x[:n_test], y[:n_test])

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The union of the local test splits of the first `eval_clients` clients."""
        parts = [self.client_data(k) for k in range(self.eval_clients)]
        return (np.concatenate([p.x_test for p in parts]), np.concatenate([p.y_test for p in parts]))


Federation = IndexedFederation | NaturalFederation


def training_rows(dataset: ArrayDataset, rows: np.ndarray) -> ArrayDataset:
    """The dataset with only these training rows (and their groups and clients); same test set."""

    def take(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[rows]

    return replace(dataset, x_train=dataset.x_train[rows], y_train=dataset.y_train[rows],
                   sensitive_train=take(dataset.sensitive_train), clients_train=take(dataset.clients_train))


def stratified_subset(dataset: ArrayDataset, size: int, seed: int) -> ArrayDataset:
    """About `size` training examples drawn per class in proportion (the test set is kept)."""
    _, kept = stratified_split_indices(dataset.y_train, size / len(dataset.y_train),
                                       np.random.default_rng([seed, 0x5B5E7]))
    return training_rows(dataset, kept)


HOLDOUT_STREAM = 0x401D  # the held-out rows depend on the data only, not on the experiment seed


def holdout_split(dataset: ArrayDataset, fraction: float) -> tuple[ArrayDataset, ArrayDataset]:
    """(the federation's part, the held-out part) of the training set: a stratified `fraction`
    held out, the same rows whatever the experiment seed; both keep the test set."""
    kept, held = stratified_split_indices(dataset.y_train, fraction, np.random.default_rng(HOLDOUT_STREAM))
    return training_rows(dataset, kept), training_rows(dataset, held)


LABELS_STREAM = 0x1ABE1


def hide_labels(train_idx: list[np.ndarray], labels: np.ndarray, spec: LabelsSection,
                seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's training rows split into (labelled, unlabelled) as `data.labels` says: a share
    per client (fixed, or uniform in [fraction, fraction_max]), stratified by class or not; every
    client keeps at least one labelled row."""
    rng = np.random.default_rng([seed, LABELS_STREAM])
    high = spec.fraction_max if spec.fraction_max is not None else spec.fraction
    labelled, unlabelled = [], []
    for rows in train_idx:
        share = rng.uniform(spec.fraction, high) if high > spec.fraction else spec.fraction
        if spec.stratified:
            keep, hide = stratified_split_indices(labels[rows], 1.0 - share, rng)
        else:
            order = rng.permutation(len(rows))
            count = min(len(rows), max(1, int(round(share * len(rows)))))
            keep, hide = np.sort(order[:count]), np.sort(order[count:])
        labelled.append(rows[keep])
        unlabelled.append(rows[hide])
    return labelled, unlabelled


def _build(spec: DataSection, seed: int) -> Federation:
    if spec.dataset == "synthetic":
        if spec.partition.kind != "natural":
            raise DataError("synthetic data has natural clients: set data.partition.kind = 'natural'")
        if spec.features.kind != "none":
            raise DataError("synthetic data has its own feature skew (data.synthetic.beta); "
                            "set data.features.kind = 'none'")
        if spec.labels.partial:
            raise DataError("data.labels hides labels of datasets held as arrays; synthetic "
                            "clients generate theirs: set data.labels.fraction = 1")
        clients = SyntheticClients(spec.synthetic, spec.num_clients, seed)
        return NaturalFederation(clients, spec.client_test_fraction, spec.synthetic.eval_clients)
    from fedsim.data.partition import partition_labels  # flwr-datasets is slow to import; only
    #                                                     building a federation needs it
    dataset = load_source(spec, seed)
    if spec.holdout > 0:
        dataset = holdout_split(dataset, spec.holdout)[0]
    if spec.train_subset is not None and spec.train_subset < len(dataset.y_train):
        dataset = stratified_subset(dataset, spec.train_subset, seed)
    parts = partition_labels(dataset.y_train, spec.num_clients, spec.partition, seed,
                             groups=dataset.sensitive_train, clients=dataset.clients_train)
    rng = np.random.default_rng([seed, 0x7E57])
    train_idx, test_idx = [], []
    for part in parts:
        local_train, local_test = stratified_split_indices(
            dataset.y_train[part], spec.client_test_fraction, rng)
        train_idx.append(part[local_train])
        test_idx.append(part[local_test])
    unlabeled_idx = None
    if spec.labels.partial:
        train_idx, unlabeled_idx = hide_labels(train_idx, dataset.y_train, spec.labels, seed)
    test_domain = None
    if spec.features.kind != "none":
        dataset, test_domain = apply_feature_skew(dataset, parts, spec.features, seed)
    return IndexedFederation(embed(dataset, spec.embedding), train_idx, test_idx, test_domain, unlabeled_idx)


@lru_cache(maxsize=4)
def _cached(spec_json: str, seed: int) -> Federation:
    return _build(DataSection.model_validate_json(spec_json), seed)


def build_federation(spec: DataSection, seed: int) -> Federation:
    """The federation for a data spec and seed, built once per process and then reused."""
    return _cached(spec.model_dump_json(), seed)
