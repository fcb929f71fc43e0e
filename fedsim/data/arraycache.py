"""Decoded datasets kept on disk as .npy files and memory-mapped, so that every process of a run
(the server and each worker) reads one copy through the page cache instead of decoding its own.

A dataset is written once under `cache_dir()/arrays/<key>/`, where the key digests what the arrays
were made from (the source, its files or fingerprint, the options that change them); later loads
map the files copy-on-write: they read like ordinary arrays and never write back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.arrays import ArrayDataset
from fedsim.data.download import cache_dir

FORMAT = 1  # bump when the layout or the decoding of any source changes
ARRAYS = ("x_train", "y_train", "x_test", "y_test", "sensitive_train", "sensitive_test", "clients_train")


def cache_key(**identity: Any) -> str:
    """A short digest of what a dataset's arrays are made from."""
    text = json.dumps({"format": FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_identity(path: Path) -> list[Any]:
    """A file or folder as it is now: its path, and the size and modification time of each file."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path), [(str(p.relative_to(path)) if p != path else "", p.stat().st_size,
                         p.stat().st_mtime_ns) for p in files]]


def _write(folder: Path, dataset: ArrayDataset) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ARRAYS:
        if (array := getattr(dataset, name)) is not None:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
    meta = {"num_classes": dataset.num_classes, "sensitive_name": dataset.sensitive_name,
            "sensitive_groups": list(dataset.sensitive_groups)}
    (tmp / "meta.json").write_text(json.dumps(meta))  # written last: marks a complete entry
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path) -> ArrayDataset:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") if (folder / f"{name}.npy").is_file()
              else None for name in ARRAYS}
    return ArrayDataset(**arrays, num_classes=meta["num_classes"], sensitive_name=meta["sensitive_name"],
                        sensitive_groups=tuple(meta["sensitive_groups"]))


def memory_mapped(key: str, build: Callable[[], ArrayDataset]) -> ArrayDataset:
    """The dataset cached under `key`, memory-mapped; built with `build` and written the first
    time. Where the cache cannot be written (read-only, full), the built arrays are returned."""
    folder = cache_dir() / "arrays" / key
    if (folder / "meta.json").is_file():
        return _read(folder)
    dataset = build()
    try:
        _write(folder, dataset)
    except OSError:
        return dataset
    return _read(folder)
