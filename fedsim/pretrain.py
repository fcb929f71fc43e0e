"""Central pretraining on the part of a dataset the federation never sees (`data.holdout`).

`fedsim pretrain SPEC --out model.pt` trains the spec's model on its held-out training rows with
the spec's local optimizer settings for `epochs` passes, and writes its state dict (for
`model.init`, e.g. FedLD's fine-tuning setting) and, for sequential models, its frozen feature
extractor beside it (`model-encoder.pt`, for `data.embedding`, e.g. GGEUR on a frozen encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clients.training import train_locally
from fedsim.config import ExperimentConfig
from fedsim.data.federation import ClientData, holdout_split
from fedsim.data.sources import load_source
from fedsim.data.tensors import LocalData
from fedsim.errors import ConfigError
from fedsim.evaluation import evaluate
from fedsim.models import build_model
from fedsim.results import replace_atomically
from fedsim.seeding import derive_seed
from fedsim.warmup import feature_extractor

PRETRAIN_STREAM = 0x9E7A


@dataclass
class Pretrained:
    """What `pretrain` wrote and how well the model does on the test set."""

    weights: Path
    encoder: Path | None
    examples: int
    test_accuracy: float
    train_loss: float


def pretrain(config: ExperimentConfig, out: Path | None, epochs: int) -> Pretrained:
    """Train `config`'s model centrally on the held-out rows; write weights (and an encoder) to
    `out`, by default to the file the spec's `model.init` names (so one spec serves both steps)."""
    init = config.model.init
    if out is None:
        out = init if init is not None else Path("pretrained.pt")
    if out.suffix == ".npz":
        raise ConfigError(f"fedsim pretrain writes a torch state dict: name it .pt, not {out}")
    if init is not None and init.resolve() == out.resolve():
        config = config.model_copy(update={"model": config.model.model_copy(update={"init": None})})
    if config.data.holdout <= 0:
        raise ConfigError("fedsim pretrain trains on the rows the federation leaves out: set "
                          "data.holdout (e.g. --set data.holdout=0.1) here and in the experiments "
                          "that use the result")
    if config.model.init is not None:
        raise ConfigError(f"model.init = {config.model.init} is not the output file: pretraining "
                          "starts from the model's own initialization (drop --out to write model.init)")
    dataset = load_source(config.data, config.experiment.seed)
    held = holdout_split(dataset, config.data.holdout)[1]
    model = build_model(config.model, held.input_shape, held.num_classes, config.experiment.seed)
    data = LocalData.from_arrays(ClientData(held.x_train, held.y_train, held.x_test, held.y_test))
    settings = config.client.model_copy(update={"local_epochs": epochs, "local_steps": None})
    metrics = train_locally(model, data, settings, [], derive_seed(config.experiment.seed, PRETRAIN_STREAM),
                            settings.lr)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, lambda tmp: torch.save(model.state_dict(), tmp))
    encoder = None
    if isinstance(model, torch.nn.Sequential) and len(model) > 1:
        encoder = out.with_name(f"{out.stem}-encoder.pt")
        replace_atomically(encoder, lambda tmp: torch.save(feature_extractor(model), tmp))
    test = evaluate(model, torch.as_tensor(held.x_test), torch.as_tensor(held.y_test))
    return Pretrained(out, encoder, len(held.y_train), test["accuracy"], metrics["train_loss"])

