"""The dataset registry: a name maps to a loader of an in-memory ArrayDataset."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedsim.config import SENSITIVE_KINDS, DataSection
from fedsim.data import cifar, fashion_mnist, hf, tabular
from fedsim.data.arraycache import cache_key, memory_mapped
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


def load_cifar10(root: Path | None, test_fraction: float, seed: int, sensitive: str | None) -> ArrayDataset:
    """CIFAR-10 with its own 50k/10k split."""
    return cifar.load("cifar10", root)


def load_cifar100(root: Path | None, test_fraction: float, seed: int, sensitive: str | None) -> ArrayDataset:
    """CIFAR-100 (fine labels) with its own 50k/10k split."""
    return cifar.load("cifar100", root)


SOURCES: dict[str, Callable[[Path | None, float, int, str | None], ArrayDataset]] = {
    "adult": load_adult,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "german": load_german,
}
MAPPED = ("cifar10", "cifar100", "fashion-mnist")  # large enough to share one copy between processes
NATURAL_SOURCES = ("synthetic",)


def dataset_names() -> list[str]:
    return sorted([*SOURCES, *NATURAL_SOURCES])


def check_dataset_name(name: str) -> None:
    """Raise a ConfigError naming the known datasets when `name` is not one of them (nor a
    user's dataset function that imports)."""
    if hf.is_library_source(name):
        return
    if is_plugin(name):
        if not callable(load_object(name, "data.dataset")):
            raise ConfigError(f"data.dataset = '{name}' is not callable")
        return
    if name not in SOURCES and name not in NATURAL_SOURCES:
        raise ConfigError(f"unknown dataset '{name}' in data.dataset; known: {', '.join(dataset_names())}, "
                          "'hf:<name or folder>', 'imagefolder:<folder>', 'csv:<file>', 'parquet:<file>', "
                          "or 'package.module:function' / 'file.py:function' for your own")


def has_sensitive_attribute(spec: DataSection) -> bool:
    """Whether the run's examples carry sensitive groups (adult and german always do, `sex` by
    default; a source read with `datasets` when `data.sensitive` names its group column; a user's
    dataset is assumed to)."""
    if hf.is_library_source(spec.dataset):
        return spec.sensitive is not None
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
    if hf.is_library_source(spec.dataset):
        if spec.partition.kind in SENSITIVE_KINDS and spec.sensitive is None:
            raise ConfigError(f"data.partition.kind = '{spec.partition.kind}' needs sensitive groups: "
                              f"set data.sensitive to the group column of {spec.dataset}")
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


def library_dataset(spec: DataSection, seed: int) -> ArrayDataset:
    """A source read with `datasets`, decoded once into the array cache."""
    splits = hf.open_splits(spec.dataset, spec.hf)
    if not spec.memory_map:
        return hf.load(spec.dataset, spec, seed, splits)
    return memory_mapped(hf.array_key(spec.dataset, spec, seed, splits),
                         lambda: hf.load(spec.dataset, spec, seed, splits))


@lru_cache(maxsize=4)
def _load(spec_json: str, seed: int) -> ArrayDataset:
    spec = DataSection.model_validate_json(spec_json)
    if hf.is_library_source(spec.dataset):
        return library_dataset(spec, seed)

    def build() -> ArrayDataset:
        return SOURCES[spec.dataset](spec.root, spec.test_fraction, seed, spec.sensitive)

    if spec.memory_map and spec.dataset in MAPPED:  # their files are fixed by checksums
        return memory_mapped(cache_key(source=spec.dataset), build)
    return build()


def load_source(spec: DataSection, seed: int) -> ArrayDataset:
    """The arrays of `spec.dataset`, loaded once per process."""
    check_dataset_name(spec.dataset)
    check_sensitive(spec)
    if is_plugin(spec.dataset):
        return user_dataset(spec.dataset, spec, seed)
    fields = {"dataset", "root", "test_fraction", "sensitive", "hf", "memory_map"}
    return _load(spec.model_dump_json(include=fields), seed)
