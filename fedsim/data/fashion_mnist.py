"""Fashion-MNIST: 28x28 grey images of 10 clothing classes, read from idx files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedsim.data.arrays import ArrayDataset
from fedsim.data.download import verified_file

NAME = "fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the decompressed idx files (the .gz bytes differ between mirrors).
FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip'ed idx file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def load(root: Path | None, base_url: str = BASE_URL) -> ArrayDataset:
    """Load Fashion-MNIST from `root/fashion-mnist`, the Debian location, or a verified download."""
    folders = ([root / NAME] if root else []) + [SYSTEM_DIR]
    arrays = {
        name: read_idx(verified_file(NAME, name, sha, folders, base_url + name, decompressed=True))
        for name, sha in FILES.items()
    }

    def images(name: str) -> np.ndarray:
        return (arrays[name].astype(np.float32) / 255.0)[:, None, :, :]

    return ArrayDataset(
        x_train=images("train-images-idx3-ubyte.gz"),
        y_train=arrays["train-labels-idx1-ubyte.gz"].astype(np.int64),
        x_test=images("t10k-images-idx3-ubyte.gz"),
        y_test=arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int64),
        num_classes=10,
    )
