"""Embeddings: the features a federation trains on, computed once per process for all clients.

`identity` flattens the inputs; a file path loads a frozen torch encoder (TorchScript, or a
pickled `nn.Module`) and maps every train and test input through it in batches.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedsim.data.arrays import ArrayDataset
from fedsim.errors import DataError


def load_encoder(path: Path) -> torch.nn.Module:
    """A frozen encoder from `path`, in eval mode on the CPU."""
    if not path.is_file():
        raise DataError(f"data.embedding: encoder file {path} not found; give a TorchScript or "
                        "torch.save'd module, or 'identity'")
    try:
        encoder = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        encoder = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(encoder, torch.nn.Module):
        raise DataError(f"data.embedding: {path} holds a {type(encoder).__name__}, not a torch module")
    return encoder.eval()


@torch.no_grad()
def encode(encoder: torch.nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    parts = [encoder(torch.as_tensor(x[i:i + batch_size])).reshape(min(batch_size, len(x) - i), -1)
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def embed(dataset: ArrayDataset, embedding: str) -> ArrayDataset:
    """The dataset with inputs replaced by their embeddings (unchanged when `embedding` is '')."""
    if not embedding:
        return dataset
    if embedding == "identity":
        flat = (dataset.x_train.reshape(len(dataset.x_train), -1),
                dataset.x_test.reshape(len(dataset.x_test), -1))
    else:
        encoder = load_encoder(Path(embedding))
        flat = (encode(encoder, dataset.x_train), encode(encoder, dataset.x_test))
    return replace(dataset, x_train=flat[0], x_test=flat[1])
