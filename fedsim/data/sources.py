"""The dataset registry: a name maps to a loader of an in-memory ArrayDataset."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedsim.config import SENSITIVE_KINDS, DataSection
from fedsim.data import fashion_mnist, tabular
from fedsim.data.arrays import ArrayDataset, split_train_test
from fedsim.errors import ConfigError
from fedsim.plugins import is_plugin, load_object


def load_digits(root: Path | None, test_fraction: float, seed: int, sensitive: str | None) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    x_train, y_train, x_test, y_test = split_train_test(
        x, bunch.target.astype(np.int64), test_fraction, seed)
    return ArrayDataset(x_train, y_train, x_test, y_test, num_classes=10)


def load_fashion_mnist(root: Path | None, test_fraction: float, seed: int,
                       sensitive: str | None) -> ArrayDataset:
    """Fashion-MNIST with its own 60k/10k split (test_fraction does not apply)."""
    return fashion_mnist.load(root)


def load_adult(root: Path | None, test_fraction: float, seed: int, sensitive: str | None) -> ArrayDataset:
    """UCI Adult with its own train/test files (test_fraction does not apply)."""
    return tabular.load_adult(root, sensitive)


def load_german(root: Path | None, test_fraction: float, seed: int, sensitive: str | None) -> ArrayDataset:
    """UCI German credit with a stratified test split of `test_fraction`."""
    return tabular.load_german(root, test_fraction, seed, sensitive)


SOURCES: dict[str, Callable[[Path | None, float, int, str | None], ArrayDataset]] = {
    "adult": load_adult,
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "german": load_german,
}
NATURAL_SOURCES = ("synthetic",)


def dataset_names() -> list[str]:
    return sorted([*SOURCES, *NATURAL_SOURCES])


def check_dataset_name(name: str) -> None:
    """Raise a ConfigError naming the known datasets when `name` is not one of them (nor a
    user's dataset function that imports)."""
    if is_plugin(name):
        if not callable(load_object(name, "data.dataset")):
            raise ConfigError(f"data.dataset = '{name}' is not callable")
        return
    if name not in SOURCES and name not in NATURAL_SOURCES:
        raise ConfigError(f"unknown dataset '{name}' in data.dataset; known: {', '.join(dataset_names())}, "
                          "or 'package.module:function' / 'file.py:function' for your own")


def has_sensitive_attribute(spec: DataSection) -> bool:
    """Whether the run's examples carry sensitive groups (adult and german always do, `sex` by
    default; a user's dataset is assumed to)."""
    return is_plugin(spec.dataset) or spec.dataset in tabular.SENSITIVE


def user_dataset(name: str, spec: DataSection, seed: int) -> ArrayDataset:
    """A user's dataset function's arrays: it returns an ArrayDataset, or a dict with x_train,
    y_train, x_test, y_test (and optional sensitive_train, sensitive_test, num_classes); it may
    take the data section and the seed."""
    function = load_object(name, "data.dataset")
    takes = len(inspect.signature(function).parameters)
    try:
        result = function(*(spec, seed)[:takes])
    except Exception as exc:
        raise ConfigError(f"data.dataset = '{name}' failed: {type(exc).__name__}: {exc}") from None
    if isinstance(result, ArrayDataset):
        return result
    required = ("x_train", "y_train", "x_test", "y_test")
    if not isinstance(result, dict) or any(k not in result for k in required):
        raise ConfigError(f"data.dataset = '{name}' must return an ArrayDataset or a dict with "
                          f"{', '.join(required)} (optional sensitive_train, sensitive_test, "
                          f"num_classes); it returned {type(result).__name__}")
    arrays = {k: np.asarray(result[k]) for k in required}
    if len(arrays["x_train"]) != len(arrays["y_train"]) or len(arrays["x_test"]) != len(arrays["y_test"]):
        raise ConfigError(f"data.dataset = '{name}': x and y of a split differ in length "
                          f"(train {len(arrays['x_train'])} / {len(arrays['y_train'])}, test "
                          f"{len(arrays['x_test'])} / {len(arrays['y_test'])})")
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    groups = {k: np.asarray(result[k], dtype=np.int64) for k in ("sensitive_train", "sensitive_test")
              if result.get(k) is not None}
    names = tuple(str(g) for g in range(int(max((g.max() for g in groups.values()), default=-1)) + 1))
    return ArrayDataset(arrays["x_train"].astype(np.float32), arrays["y_train"].astype(np.int64),
                        arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64),
                        int(result.get("num_classes", labels.max() + 1)),
                        groups.get("sensitive_train"), groups.get("sensitive_test"),
                        "sensitive" if groups else "", names if groups else ())


def check_sensitive(spec: DataSection) -> None:
    """Raise a ConfigError when `data.sensitive` (or a sensitive-attribute partition) does not fit
    the dataset."""
    if is_plugin(spec.dataset):
        return
    if spec.partition.kind in SENSITIVE_KINDS and spec.dataset not in tabular.SENSITIVE:
        raise ConfigError(f"data.partition.kind = '{spec.partition.kind}' needs a dataset with a "
                          f"sensitive attribute ({', '.join(tabular.SENSITIVE)}), not {spec.dataset}")
    if spec.sensitive is None:
        return
    if spec.dataset not in tabular.SENSITIVE:
        raise ConfigError(f"data.sensitive is set but {spec.dataset} has no sensitive attribute; "
                          f"datasets with one: {', '.join(tabular.SENSITIVE)}")
    tabular.sensitive_rule(spec.dataset, spec.sensitive)


@lru_cache(maxsize=4)
def _load(name: str, root: Path | None, test_fraction: float, seed: int,
          sensitive: str | None) -> ArrayDataset:
    return SOURCES[name](root, test_fraction, seed, sensitive)


def load_source(spec: DataSection, seed: int) -> ArrayDataset:
    """The arrays of `spec.dataset`, loaded once per process."""
    check_dataset_name(spec.dataset)
    check_sensitive(spec)
    if is_plugin(spec.dataset):
        return user_dataset(spec.dataset, spec, seed)
    return _load(spec.dataset, spec.root, spec.test_fraction, seed, spec.sensitive)
