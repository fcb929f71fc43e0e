"""FedBN (Li et al., ICLR 2021): local batch normalization.

Client: trains the whole model from the global weights with its own batch-norm layers (affine
weights and running statistics; the global ones before its first round), keeps those and sends
the rest. Server: the sample-weighted mean of everything else. Needs a model with batch
normalization (model.name = "resnet", or your own). The personal model is the global model with
the client's batch-norm layers.
"""

from torch import nn

from fedsim.config import ExperimentConfig
from fedsim.errors import ConfigError
from fedsim.models import BATCHNORM_MODELS, MODELS
from fedsim.personal import LocalLayers, batchnorm_keys


class FedBN(LocalLayers):
    """Local batch-norm layers, everything else shared."""

    name = "fedbn"

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        if config.model.name in MODELS and config.model.name not in BATCHNORM_MODELS:
            raise ConfigError(f"fedbn keeps batch-norm layers local, and model.name = "
                              f"'{config.model.name}' has none: use model.name = 'resnet'")

    def local_keys(self, model: nn.Module) -> list[str]:
        keys = batchnorm_keys(model)
        if not keys:
            raise ValueError(f"fedbn: {type(model).__name__} has no batch-norm layer")
        return keys
