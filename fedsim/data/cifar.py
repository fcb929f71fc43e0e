"""CIFAR-10 and CIFAR-100: 32x32 colour images from their home archives (the python version).

Each archive holds pickled batches, a dict with `data` (N x 3072 uint8, channel-major rows) and
the labels (`labels`; CIFAR-100: `fine_labels`). The archive's MD5 sum, as its home page publishes
it, is checked before anything in it is unpickled. Images are normalized per channel with the
training set's standard mean and standard deviation.
"""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.data.arrays import ArrayDataset
from fedsim.data.download import verified_file

HOME = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class Archive:
    """Where one CIFAR variant lives and how its archive is laid out."""

    name: str  # fedsim's dataset name, also the folder under data.root
    file: str
    checksum: str
    train_members: tuple[str, ...]
    test_member: str
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


ARCHIVES = {
    "cifar10": Archive("cifar10", "cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a",
                       tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                       "cifar-10-batches-py/test_batch", b"labels", 10,
                       (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Archive("cifar100", "cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85",
                        ("cifar-100-python/train",), "cifar-100-python/test", b"fine_labels", 100,
                        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _batches(archive: tarfile.TarFile, members: tuple[str, ...], label_key: bytes
             ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for member in members:
        handle = archive.extractfile(member)
        if handle is None:
            raise KeyError(member)
        batch = pickle.load(handle, encoding="bytes")  # the archive's checksum was verified
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load(name: str, root: Path | None, base_url: str = HOME) -> ArrayDataset:
    """CIFAR-10 or -100 from `root/<name>/<archive>`, else a verified (and resumable) download
    from the dataset's home into the cache."""
    spec = ARCHIVES[name]
    path = verified_file(name, spec.file, spec.checksum, [root / name] if root else [],
                         base_url + spec.file)
    with tarfile.open(path, "r:gz") as archive:
        x_train, y_train = _batches(archive, spec.train_members, spec.label_key)
        x_test, y_test = _batches(archive, (spec.test_member,), spec.label_key)
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]

    def normalized(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 255.0 - mean) / std

    return ArrayDataset(normalized(x_train), y_train, normalized(x_test), y_test, spec.num_classes)
