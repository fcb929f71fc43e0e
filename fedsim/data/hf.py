"""Datasets read with Hugging Face `datasets`: hub datasets (from the hub or its local cache, via
flwr-datasets' FederatedDataset), folders written by `save_to_disk`, folders of images per class
and CSV / parquet tables.

`data.dataset` names the source: `hf:<hub name or folder>`, `imagefolder:<folder>`,
`csv:<file or folder>`, `parquet:<file or folder>`; `data.hf` says which splits and columns to use.
A source with an image column becomes images (channels first, scaled to [0, 1]); any other becomes
a table, preprocessed like Adult (rows with missing values dropped, categoricals one-hot, numerics
standardized with training statistics). `data.sensitive` names a group column, kept among the
features; `data.hf.client_column` the natural client of each row.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import DataSection, HFSection
from fedsim.data.arraycache import cache_key, file_identity
from fedsim.data.arrays import ArrayDataset, stratified_train_mask
from fedsim.data.tabular import encode
from fedsim.errors import DataError
from fedsim.plugins import LIBRARY_SOURCES

BUILDERS = {"imagefolder": "data_dir", "csv": "data_files", "parquet": "data_files"}


def is_library_source(name: str) -> bool:
    """Whether `data.dataset` names a source read with the `datasets` library."""
    return name.startswith(LIBRARY_SOURCES)


def local_path(name: str) -> Path | None:
    """The file or folder a source names, when it is one on this machine."""
    kind, _, where = name.partition(":")
    return Path(where) if kind in BUILDERS or Path(where).exists() else None


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def open_splits(name: str, hf: HFSection) -> dict[str, Any]:
    """The source's splits as `datasets.Dataset`s (memory-mapped Arrow tables, nothing decoded)."""
    import datasets
    from flwr_datasets import FederatedDataset

    kind, _, where = name.partition(":")
    if kind == "hf" and Path(where).is_dir() and _saved_to_disk(Path(where)):
        loaded = datasets.load_from_disk(where)
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {hf.split: loaded}
    if kind in BUILDERS:
        if not Path(where).exists():
            raise DataError(f"data.dataset = '{name}': {where} does not exist")
        source = {"dataset": kind, BUILDERS[kind]: where}
    else:
        source = {"dataset": where, "subset": hf.subset}
    federated = FederatedDataset(**source, partitioners={hf.split: 1}, shuffle=False)
    splits = {}
    for split in (hf.split, hf.test_split):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flwr-datasets warns about datasets it has not tested
                splits[split] = federated.load_split(split)
        except ValueError as exc:
            if split == hf.split:
                raise DataError(f"data.dataset = '{name}' has no split '{split}' (data.hf.split): "
                                f"{exc}") from None
        except Exception as exc:  # the hub unreachable and nothing cached, a bad folder, ...
            raise DataError(f"cannot load data.dataset = '{name}': {type(exc).__name__}: {exc}. "
                            "Offline? Use a dataset in the Hugging Face cache (HF_DATASETS_OFFLINE=1), "
                            "a folder written by save_to_disk, or a local folder or file") from None
    return splits


def array_key(name: str, spec: DataSection, seed: int, splits: dict[str, Any]) -> str:
    """The array cache's key for this source as loaded (its files or the datasets' fingerprints)."""
    where = local_path(name)
    identity = file_identity(where) if where is not None else [
        getattr(split, "_fingerprint", "") for split in splits.values()]
    drawn = spec.hf.test_split not in splits  # the test split is drawn: it depends on the seed
    return cache_key(source=name, identity=identity, hf=spec.hf.model_dump(mode="json"),
                     sensitive=spec.sensitive,
                     split=[spec.test_fraction, seed] if drawn else None)


def _codes(values: list[Any], feature: Any = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes of a column's values (a ClassLabel's own, else sorted unique values)."""
    names = getattr(feature, "names", None)
    if names is not None:
        return np.asarray(values, dtype=np.int64), tuple(names)
    levels, codes = np.unique(np.asarray(values, dtype=object if isinstance(values[0], str) else None),
                              return_inverse=True)
    return codes.astype(np.int64), tuple(str(v) for v in levels)


def _image_column(split: Any, hf: HFSection) -> str | None:
    import datasets

    if hf.image_column is not None:
        return hf.image_column
    return next((k for k, f in split.features.items() if isinstance(f, datasets.Image)), None)


def _images(split: Any, column: str, hf: HFSection) -> np.ndarray:
    """A split's images as float32 (N, C, H, W) in [0, 1], converted to one mode and size."""
    first = split[0][column]
    mode = hf.image_mode if hf.image_mode != "auto" else ("L" if first.mode in ("L", "1") else "RGB")
    size = tuple(hf.image_size[::-1]) if hf.image_size else first.size  # PIL sizes are (w, h)
    channels = 1 if mode == "L" else 3
    out = np.empty((len(split), channels, size[1], size[0]), dtype=np.float32)
    row = 0
    for batch in split.select_columns([column]).iter(batch_size=512):
        for image in batch[column]:
            image = image.convert(mode)
            if image.size != size:
                if not hf.image_size:
                    raise DataError(f"images of column '{column}' differ in size ({first.size} and "
                                    f"{image.size}); set data.hf.image_size = [height, width]")
                image = image.resize(size)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
            out[row] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
            row += 1
    return out


def _require(split: Any, columns: list[str | None], name: str) -> None:
    missing = [c for c in columns if c is not None and c not in split.column_names]
    if missing:
        raise DataError(f"data.dataset = '{name}' has no column {', '.join(repr(c) for c in missing)}; "
                        f"its columns: {', '.join(split.column_names)} (set data.hf.label_column, "
                        "data.hf.client_column or data.sensitive)")


def load(name: str, spec: DataSection, seed: int, splits: dict[str, Any]) -> ArrayDataset:
    """The arrays of a source opened with `open_splits`: the test split, or else a stratified
    `data.test_fraction` of the training split."""
    import datasets
    from pandas.api.types import is_numeric_dtype

    hf = spec.hf
    train = splits[hf.split]
    image = _image_column(train, hf)
    _require(train, [hf.label_column, image, spec.sensitive, hf.client_column], name)
    if hf.test_split in splits:
        parts = [train, splits[hf.test_split]]
        is_train = np.repeat([True, False], [len(parts[0]), len(parts[1])])
    else:
        parts = [train]
        is_train = stratified_train_mask(np.asarray(train[hf.label_column]), spec.test_fraction, seed)
    if image is not None:
        x = np.concatenate([_images(part, image, hf) for part in parts])
        columns = [c for c in (hf.label_column, spec.sensitive, hf.client_column) if c is not None]
        frame = datasets.concatenate_datasets([p.select_columns(columns) for p in parts]).to_pandas()
    else:
        frame = datasets.concatenate_datasets(parts).to_pandas()
        keep = frame.notna().all(axis=1).to_numpy()
        frame, is_train = frame[keep].reset_index(drop=True), is_train[keep]
        special = {hf.label_column, hf.client_column}
        features = hf.feature_columns or [c for c in frame.columns if c not in special]
        _require(train, features, name)
        table = frame[features]
        numeric = [c for c in features if is_numeric_dtype(table[c])]
        x = encode(table, numeric, is_train)
    y, classes = _codes(frame[hf.label_column].tolist(), train.features.get(hf.label_column))
    z, groups = _codes(frame[spec.sensitive].tolist()) if spec.sensitive else (None, ())
    clients = _codes(frame[hf.client_column].tolist())[0] if hf.client_column else None
    return ArrayDataset(
        x[is_train], y[is_train], x[~is_train], y[~is_train], num_classes=len(classes),
        sensitive_train=None if z is None else z[is_train],
        sensitive_test=None if z is None else z[~is_train],
        sensitive_name=spec.sensitive or "", sensitive_groups=groups,
        clients_train=None if clients is None else clients[is_train])
