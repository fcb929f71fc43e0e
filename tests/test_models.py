"""Built-in models: shapes and sizes against their published definitions."""

import pytest
import torch

from fedsim.config import ModelSection
from fedsim.errors import ConfigError
from fedsim.models import build_model


def test_lenet5_has_niid_benchs_layers_and_size():
    model = build_model(ModelSection(name="lenet5"), (1, 28, 28), 10, 0)
    # conv 6x(1x5x5)+6, conv 16x(6x5x5)+16, dense 256->120, 120->84, 84->10, each with a bias
    expected = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (256 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 44426
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    cifar = build_model(ModelSection(name="lenet5"), (3, 32, 32), 10, 0)  # NIID-Bench's 16 x 5 x 5
    assert cifar[7].in_features == 400 and cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_lenet5_refuses_images_too_small_for_its_convolutions():
    with pytest.raises(ConfigError, match="lenet5.*at least 16x16, got 8x8"):
        build_model(ModelSection(name="lenet5"), (1, 8, 8), 10, 0)
