"""In-memory datasets: train and test arrays with their shape metadata."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    """A dataset held as arrays: float32 inputs, int64 labels, a predefined train/test split,
    optionally a sensitive attribute's group index per row (for fairness) and each training row's
    natural client."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    sensitive_train: np.ndarray | None = None
    sensitive_test: np.ndarray | None = None
    sensitive_name: str = ""
    sensitive_groups: tuple[str, ...] = ()
    clients_train: np.ndarray | None = None  # the natural client of each training row, when known

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split_train_test(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of one labelled array into (x_train, y_train, x_test, y_test)."""
    train_idx, test_idx = stratified_split_indices(y, test_fraction, np.random.default_rng(seed))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def stratified_train_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """True for the rows a stratified `test_fraction` test split (drawn with `seed`) leaves for
    training."""
    _, test = stratified_split_indices(labels, test_fraction, np.random.default_rng(seed))
    is_train = np.ones(len(labels), dtype=bool)
    is_train[test] = False
    return is_train


def stratified_split_indices(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a stratified train/test split: each class gives round(share) to test,
    keeping at least one example of that class for training."""
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = min(int(round(test_fraction * len(members))), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    if not train:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
