"""A federated warm-up whose trained feature extractor becomes the run's frozen encoder.

FedAvg trains `data.warmup.model` on the raw inputs for `data.warmup.rounds` rounds (a run of its
own); every layer but the last is saved as `encoder.pt` beside it, and the main run then trains
on the embeddings that encoder gives (`data.embedding` points at it). Warm-ups live in
`<output.dir>/warmups/<hash of their config>`, so runs that share one (a comparison's variants
at one heterogeneity level and seed) train it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsim.config import ExperimentConfig
from fedsim.data.federation import build_federation
from fedsim.models import build_model
from fedsim.results import replace_atomically

ENCODER_FILE = "encoder.pt"


def feature_extractor(model: nn.Module) -> nn.Module:
    """Every layer of a sequential model but the last (the classifier), frozen, in eval mode."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"a warm-up needs a sequential model, got {type(model).__name__}")
    encoder = model[:-1].eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def warmup_config(config: ExperimentConfig) -> ExperimentConfig:
    """The warm-up run: FedAvg on the raw inputs with the warm-up model, its model saved, in a
    folder named by the hash of everything that shapes it."""
    raw = config.to_json_dict()
    raw["data"]["embedding"] = ""
    raw["model"] = {**raw["model"], "name": config.data.warmup.model}
    raw["experiment"]["rounds"] = config.data.warmup.rounds
    raw["strategy"] = {"name": "fedavg", "clients_per_round": config.strategy.clients_per_round,
                       "fraction": config.strategy.fraction}
    raw["ggeur"]["enabled"] = False
    raw["evaluation"]["decomposition"] = False
    raw["experiment"]["name"] = "warmup"
    raw.pop("output")
    raw.pop("engine")  # how it runs does not change what it learns
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    raw["engine"] = config.engine.model_dump(mode="json")
    raw["output"] = {**config.output.model_dump(mode="json"), "save_model": True,
                     "run_dir": str(config.output.dir / "warmups" / key),
                     "mlflow": False, "tensorboard": False}  # a step of the run, not a run to track
    return ExperimentConfig.model_validate(raw)


def with_warmup_encoder(config: ExperimentConfig, run_dir: Path,
                        run: Callable[[ExperimentConfig], object]) -> ExperimentConfig:
    """Run the warm-up with `run` (unless an identical one finished before), save its encoder,
    and return `config` set to use it in `run_dir`."""
    warm = warmup_config(config)
    encoder_path = warm.output.run_dir / ENCODER_FILE
    if not encoder_path.is_file():
        run(warm)
        federation = build_federation(warm.data, warm.experiment.seed)
        model = build_model(warm.model, federation.input_shape, federation.num_classes,
                            warm.experiment.seed)
        with np.load(warm.output.run_dir / "model.npz") as trained:
            model.load_state_dict({k: torch.as_tensor(trained[k]) for k in trained.files})
        # a killed run leaves no half-written encoder
        replace_atomically(encoder_path, lambda tmp: torch.save(feature_extractor(model), tmp))
    raw = config.to_json_dict()
    raw["data"]["embedding"] = str(encoder_path.resolve())
    raw["output"]["run_dir"] = str(run_dir)
    return ExperimentConfig.model_validate(raw)
