"""A deployed node's own data, found through its node config.

A SuperNode holds one client. Its `--node-config` says where that client's data is:

- `data-file="/path/client.npz"`: NumPy arrays `x_train`, `y_train` and optionally `x_test`,
  `y_test` (else a stratified `data.client_test_fraction` of the training rows is held out) and
  `z_train`, `z_test` (sensitive group per example, integers from 0);
- `data-file="/path/client.csv"`: a header row; a `label` column (integer class), optional
  `split` (`train` or `test`) and `group` (sensitive group) columns, every other column a
  numeric feature;
- `partition-id=K` (demos): client K of the experiment's own dataset and partition, built once
  on the node and cached as an `.npz` file, so later messages only read that file.

`client-id` names the client (default: `partition-id`); the clients of one federation are
numbered 0..N-1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.data.arrays import stratified_split_indices
from fedsim.data.download import cache_dir
from fedsim.data.federation import ClientData, build_federation
from fedsim.errors import DataError
from fedsim.seeding import derive_seed

SPLIT_STREAM = 0x5D17


@dataclass(frozen=True)
class NodeData:
    """The node's client id and its local data."""

    client_id: int
    data: ClientData

    def shaped(self, input_shape: tuple[int, ...]) -> NodeData:
        """The same data with every example reshaped to `input_shape` (e.g. a CSV file's flat
        rows as the 1x8x8 images the experiment's model expects)."""
        data = self.data
        x_train, x_test = (x.reshape(len(x), *input_shape) for x in (data.x_train, data.x_test))
        return NodeData(self.client_id, replace(data, x_train=x_train, x_test=x_test))

    def client_data(self, client_id: int) -> ClientData:
        if client_id != self.client_id:
            raise DataError(f"this node holds client {self.client_id}'s data, not client "
                            f"{client_id}'s; check the node's client-id")
        return self.data


def _held_out(x: np.ndarray, y: np.ndarray, z: np.ndarray | None, fraction: float,
              seed: int) -> ClientData:
    train, test = stratified_split_indices(y, fraction, np.random.default_rng(seed))
    groups = (None, None) if z is None else (z[train], z[test])
    return ClientData(x[train], y[train], x[test], y[test], *groups)


def _read_npz(path: Path, fraction: float, seed: int) -> ClientData:
    with np.load(path) as arrays:
        missing = {"x_train", "y_train"} - set(arrays.files)
        if missing:
            raise DataError(f"{path} lacks the arrays {sorted(missing)}; a node's .npz file needs "
                            "x_train and y_train (and optionally x_test, y_test, z_train, z_test)")
        data = {k: arrays[k] for k in arrays.files}
    x, y = data["x_train"].astype(np.float32), data["y_train"].astype(np.int64)
    if "x_test" not in data:
        return _held_out(x, y, data.get("z_train"), fraction, seed)
    return ClientData(x, y, data["x_test"].astype(np.float32), data["y_test"].astype(np.int64),
                      data.get("z_train"), data.get("z_test"))


def _read_csv(path: Path, fraction: float, seed: int) -> ClientData:
    import pandas as pd  # here: most nodes read .npz files, and every message starts a process

    frame = pd.read_csv(path)
    if "label" not in frame:
        raise DataError(f"{path} has no 'label' column; a node's CSV file needs one (the class, "
                        "an integer from 0), plus numeric feature columns")
    features = frame.drop(columns=[c for c in ("label", "split", "group") if c in frame])
    bad = [c for c in features if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise DataError(f"{path}: feature columns must be numeric, these are not: {bad} "
                        "(encode them first, e.g. one-hot)")
    x = features.to_numpy(np.float32)
    y = frame["label"].to_numpy(np.int64)
    z = frame["group"].to_numpy(np.int64) if "group" in frame else None
    if "split" not in frame:
        return _held_out(x, y, z, fraction, seed)
    test = (frame["split"] == "test").to_numpy()
    groups = (None, None) if z is None else (z[~test], z[test])
    return ClientData(x[~test], y[~test], x[test], y[test], *groups)


def read_data_file(path: str | Path, config: ExperimentConfig, client_id: int) -> ClientData:
    """One client's data from a `.npz` or `.csv` file (format in the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"node data file {path} does not exist; set the node's data-file to "
                        "an existing .npz or .csv file")
    seed = derive_seed(config.experiment.seed, client_id, SPLIT_STREAM)
    fraction = config.data.client_test_fraction
    if path.suffix == ".npz":
        return _read_npz(path, fraction, seed)
    if path.suffix == ".csv":
        return _read_csv(path, fraction, seed)
    raise DataError(f"node data file {path}: unknown format '{path.suffix}'; use .npz or .csv")


def partition_file(config: ExperimentConfig, partition_id: int, folder: Path | None = None) -> Path:
    """Client `partition_id` of the experiment's federation as a cached `.npz` file."""
    spec = config.data.model_dump_json() + str(config.experiment.seed)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    path = (folder or cache_dir() / "nodes") / key / f"client-{partition_id}.npz"
    if not path.exists():
        federation = build_federation(config.data, config.experiment.seed)
        if not 0 <= partition_id < federation.num_clients:
            raise DataError(f"partition-id {partition_id} is out of range: the experiment has "
                            f"{federation.num_clients} clients (data.num_clients)")
        data = federation.client_data(partition_id)
        arrays = {k: v for k, v in vars(data).items() if v is not None}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return path


def _int_setting(node_config: dict[str, Any], key: str) -> int | None:
    if key not in node_config:
        return None
    try:
        return int(node_config[key])
    except (TypeError, ValueError):
        raise DataError(f"node config {key} = {node_config[key]!r} is not an integer") from None


def load_node_data(node_config: dict[str, Any], config: ExperimentConfig) -> NodeData:
    """The client this node holds and its data, as its node config describes them."""
    partition = _int_setting(node_config, "partition-id")
    client_id = _int_setting(node_config, "client-id")
    client_id = partition if client_id is None else client_id
    if client_id is None:
        raise DataError("the node config names no client: set client-id (with data-file) or "
                        "partition-id, e.g. --node-config 'client-id=0 data-file=\"/data/c0.npz\"'")
    if "data-file" in node_config:
        path = Path(str(node_config["data-file"]))
    elif partition is not None:
        folder = node_config.get("cache-dir")
        path = partition_file(config, partition, Path(str(folder)) if folder else None)
    else:
        raise DataError("the node config says nowhere where its data is: set data-file "
                        "(.npz or .csv) or partition-id (a partition of the experiment's dataset)")
    return NodeData(client_id, read_data_file(path, config, client_id))
