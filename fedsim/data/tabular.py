"""Tabular datasets with a sensitive attribute: UCI Adult and UCI German credit.

Both follow the standard preprocessing of the fairness literature: rows with missing values are
dropped, categorical columns one-hot encoded (categories from train and test together), numeric
columns standardized with the training rows' mean and standard deviation. The sensitive attribute
stays among the features; its group index per row is kept beside the arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsim.data.arrays import ArrayDataset, stratified_train_mask
from fedsim.data.download import verified_file
from fedsim.errors import ConfigError

if TYPE_CHECKING:  # pandas is imported where a table is read: a deployed client's every
    import pandas as pd  # message starts a new process, which need not pay for it

UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/"

ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
                 "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
                 "hours-per-week", "native-country", "income"]
ADULT_NUMERIC = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
ADULT_FILES = {"adult.data": "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
               "adult.test": "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05"}

GERMAN_COLUMNS = ["status", "duration", "credit-history", "purpose", "amount", "savings",
                  "employment", "installment-rate", "personal-status-sex", "other-debtors",
                  "residence-since", "property", "age", "other-plans", "housing", "existing-credits",
                  "job", "people-liable", "telephone", "foreign-worker", "credit"]
GERMAN_NUMERIC = ["duration", "amount", "installment-rate", "residence-since", "age",
                  "existing-credits", "people-liable"]
GERMAN_FILES = {"german.data": "b21f3d81db8071257d5ff1deaeba1fd4303b62712e6fcc9715c7a86202cb5871"}
GERMAN_FEMALE = {"A92", "A95"}  # attribute 9: female divorced/separated/married, female single

# Sensitive attributes: name -> (group names, function from the raw frame to group indices).
SensitiveRule = tuple[tuple[str, ...], Callable[["pd.DataFrame"], np.ndarray]]
ADULT_SENSITIVE: dict[str, SensitiveRule] = {
    "sex": (("female", "male"), lambda df: (df["sex"] == "Male").to_numpy(np.int64)),
    "race": (("non-white", "white"), lambda df: (df["race"] == "White").to_numpy(np.int64)),
}
GERMAN_SENSITIVE: dict[str, SensitiveRule] = {
    "sex": (("female", "male"),
            lambda df: (~df["personal-status-sex"].isin(GERMAN_FEMALE)).to_numpy(np.int64)),
    "age": (("<=25", ">25"), lambda df: (df["age"] > 25).to_numpy(np.int64)),
}
SENSITIVE = {"adult": ADULT_SENSITIVE, "german": GERMAN_SENSITIVE}


def sensitive_rule(dataset: str, attribute: str | None) -> tuple[str, SensitiveRule]:
    """The named sensitive attribute of `dataset` (default: its first, `sex`)."""
    rules = SENSITIVE[dataset]
    name = attribute or next(iter(rules))
    if name not in rules:
        raise ConfigError(f"data.sensitive = '{name}' is not an attribute of {dataset}; "
                          f"choose one of: {', '.join(rules)}")
    return name, rules[name]


def encode(frame: pd.DataFrame, numeric: list[str], train_rows: np.ndarray) -> np.ndarray:
    """One-hot categoricals and standardized numerics (statistics from `train_rows`), float32."""
    import pandas as pd

    categorical = [c for c in frame.columns if c not in numeric]
    values = frame[numeric].astype(np.float64)
    mean, std = values[train_rows].mean(), values[train_rows].std(ddof=0).replace(0.0, 1.0)
    dummies = pd.get_dummies(frame[categorical], dtype=np.float32)
    return np.hstack([((values - mean) / std).to_numpy(np.float32), dummies.to_numpy(np.float32)])


def _files(dataset: str, files: dict[str, str], root: Path | None, base_url: str) -> dict[str, Path]:
    folders = [root / dataset] if root else []
    return {name: verified_file(dataset, name, sha, folders, base_url + name)
            for name, sha in files.items()}


def _dataset(frame: pd.DataFrame, labels: np.ndarray, numeric: list[str], is_train: np.ndarray,
             dataset: str, attribute: str | None) -> ArrayDataset:
    name, (groups, rule) = sensitive_rule(dataset, attribute)
    x = encode(frame, numeric, is_train)
    z = rule(frame)
    return ArrayDataset(x[is_train], labels[is_train], x[~is_train], labels[~is_train], num_classes=2,
                        sensitive_train=z[is_train], sensitive_test=z[~is_train],
                        sensitive_name=name, sensitive_groups=groups)


def load_adult(root: Path | None, attribute: str | None = None,
               base_url: str = UCI + "adult/") -> ArrayDataset:
    """Adult: 30,162 training and 15,060 test rows without missing values; label income >50K."""
    import pandas as pd

    paths = _files("adult", ADULT_FILES, root, base_url)
    parts = [pd.read_csv(paths[name], names=ADULT_COLUMNS, skipinitialspace=True, na_values="?",
                         skiprows=1 if name == "adult.test" else 0).dropna()
             for name in ("adult.data", "adult.test")]
    is_train = np.repeat([True, False], [len(parts[0]), len(parts[1])])
    frame = pd.concat(parts, ignore_index=True)
    labels = frame.pop("income").str.rstrip(".").eq(">50K").to_numpy(np.int64)
    return _dataset(frame, labels, ADULT_NUMERIC, is_train, "adult", attribute)


def load_german(root: Path | None, test_fraction: float, seed: int, attribute: str | None = None,
                base_url: str = UCI + "statlog/german/") -> ArrayDataset:
    """German credit: 1,000 rows, label 1 = good credit; a stratified test split of `test_fraction`."""
    import pandas as pd

    path = _files("german", GERMAN_FILES, root, base_url)["german.data"]
    frame = pd.read_csv(path, names=GERMAN_COLUMNS, sep=" ")
    labels = (frame.pop("credit") == 1).to_numpy(np.int64)
    is_train = stratified_train_mask(labels, test_fraction, seed)
    return _dataset(frame, labels, GERMAN_NUMERIC, is_train, "german", attribute)
