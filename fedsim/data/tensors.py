"""One client's data as tensors on a worker's device: what local training and a method's client
half work on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.data.federation import ClientData


@dataclass
class LocalData:
    """One client's tensors, already on the worker's device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    z_train: torch.Tensor | None = None  # sensitive groups, when the dataset has them
    z_test: torch.Tensor | None = None
    x_unlabeled: torch.Tensor | None = None  # training inputs without labels (data.labels)

    @classmethod
    def from_arrays(cls, data: ClientData, device: torch.device | str = "cpu") -> LocalData:
        """Move one client's numpy arrays onto `device`."""
        arrays = (data.x_train, data.y_train, data.x_test, data.y_test, data.z_train, data.z_test,
                  data.x_unlabeled)
        return cls(*(None if a is None else torch.as_tensor(a, device=device) for a in arrays))
