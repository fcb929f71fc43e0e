"""Model zoo: small PyTorch models selectable by name (`model.name` in the experiment), or a
user's model function by import string."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsim.config import ModelSection
from fedsim.errors import ConfigError
from fedsim.plugins import is_plugin, load_object


def logistic_regression(input_shape: tuple[int, ...], num_classes: int, spec: ModelSection) -> nn.Module:
    """Multinomial logistic regression on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, spec: ModelSection) -> nn.Module:
    """Fully connected network with ReLU hidden layers of sizes `model.hidden`."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model.name = '{model}' needs image inputs (C, H, W), got {input_shape}")
    return input_shape  # type: ignore[return-value]


def simple_cnn(input_shape: tuple[int, ...], num_classes: int, spec: ModelSection) -> nn.Module:
    """The FL benchmarks' small CNN: two 5x5 conv + max-pool blocks (32, 64), then dense 128."""
    channels, height, width = _image_shape(input_shape, "cnn")
    features = nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(features, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))


def lenet5(input_shape: tuple[int, ...], num_classes: int, spec: ModelSection) -> nn.Module:
    """LeNet-5 as NIID-Bench's `simple-cnn` (Li et al., ICDE 2022): two unpadded 5x5 conv + max-pool
    blocks (6, 16 channels), then dense 120 and 84."""
    channels, height, width = _image_shape(input_shape, "lenet5")
    side = [((n - 4) // 2 - 4) // 2 for n in (height, width)]
    if min(side) < 1:
        raise ConfigError(f"model.name = 'lenet5' needs images of at least 16x16, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side[0] * side[1], 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, spec: ModelSection) -> nn.Module:
    """A small ResNet (ResNet-8 style: three stages of one basic block, widths 16/32/64)."""
    channels, _, _ = _image_shape(input_shape, "resnet")
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


BATCHNORM_MODELS = frozenset({"resnet"})  # the built-in models with BatchNorm statistics
MODELS: dict[str, Callable[[tuple[int, ...], int, ModelSection], nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": simple_cnn,
    "lenet5": lenet5,
    "resnet": resnet,
}


def model_function(spec: ModelSection) -> Callable[[tuple[int, ...], int, ModelSection], nn.Module]:
    """The function `model.name` names: a built-in model or a user's, `(input shape, number of
    classes, model section) -> nn.Module`."""
    if spec.name in MODELS:
        return MODELS[spec.name]
    if not is_plugin(spec.name):
        raise ConfigError(f"unknown model '{spec.name}' in model.name; known: {', '.join(sorted(MODELS))}, "
                          "or 'package.module:function' / 'file.py:function' for your own")
    function = load_object(spec.name, "model.name")
    if not callable(function):
        raise ConfigError(f"model.name = '{spec.name}' is not callable")
    return function


def check_model(spec: ModelSection) -> None:
    """The model exists, built-in models take no keys but their own, and the weights it starts
    from (`model.init`) are there."""
    model_function(spec)
    if spec.name in MODELS and spec.model_extra:
        raise ConfigError(f"unknown key(s) {['model.' + k for k in spec.model_extra]} for the "
                          f"built-in model '{spec.name}' (its keys: name, hidden)")
    if spec.init is not None:
        check_init_file(Path(spec.init))


def check_init_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"model.init = {path}: no such file (make one with `fedsim pretrain`)")


def build_model(spec: ModelSection, input_shape: tuple[int, ...], num_classes: int,
                seed: int) -> nn.Module:
    """A freshly initialised model; the same seed gives the same initial weights."""
    function = model_function(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = function(tuple(input_shape), num_classes, spec)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"model.name = '{spec.name}' failed to build a model for inputs "
                              f"{tuple(input_shape)} and {num_classes} classes: "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = '{spec.name}' returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    if getattr(spec, "init", None) is not None:
        load_initial_weights(model, Path(spec.init))
    return model


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Load `model.init`: a state dict (torch.save'd, e.g. by `fedsim pretrain`) or an .npz of
    named arrays, which must match the model's names and shapes exactly."""
    check_init_file(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                state = {k: torch.as_tensor(arrays[k]) for k in arrays.files}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.init = {path} is not a state dict: {type(exc).__name__}: {exc}") from None
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        raise ConfigError(f"model.init = {path} does not fit the model ({type(model).__name__}): "
                          f"missing {missing[:5]}, unexpected {extra[:5]}, other shapes {wrong[:5]}; "
                          "pretrain with the same [model] and data")
    model.load_state_dict(state)
