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


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_channels_last_changes_the_memory_order_not_the_run(tmp_path, name):
    """engine.channels_last keeps the worker's convolutions channels-last (the model it trained
    with, after the run); whole runs with and without it end with the same weights up to float
    rounding."""
    from pathlib import Path

    import numpy as np

    from clients.runtime import resident_for, worker_model
    from fedsim.config import load_config
    from fedsim.runner import run_experiment

    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
    finals = {}
    for order in ("true", "false"):
        config = load_config(quickstart, [f"model.name={name}", "engine.backend=inprocess",
                                          "experiment.rounds=2", f"engine.channels_last={order}",
                                          f"output.run_dir={tmp_path / order}"])
        conv = next(m for m in worker_model(config, (1, 8, 8), 10).modules()
                    if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (order == "true")
        assert conv.weight.is_contiguous() == (order == "false")
        finals[order] = run_experiment(config).rounds["test_accuracy"].iloc[-1]
        trained = next(m for m in resident_for(config).model.modules()
                       if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert trained.weight.is_contiguous(memory_format=torch.channels_last) == (order == "true")
    assert finals["true"] == pytest.approx(finals["false"], abs=1e-4)
    with np.load(tmp_path / "true" / "model.npz") as cl, np.load(tmp_path / "false" / "model.npz") as plain:
        assert all(np.allclose(cl[k], plain[k], atol=1e-5) for k in plain.files)
