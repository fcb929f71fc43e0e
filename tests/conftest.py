"""Test setup: quiet Flower/Ray, the shared offline datasets, and a private download cache."""

import os
from pathlib import Path

import pytest

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if "FEDSIM_DATA_DIR" not in os.environ and SHARED_DATASETS.is_dir():
    os.environ["FEDSIM_DATA_DIR"] = str(SHARED_DATASETS)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def data_dir() -> Path:
    root = os.environ.get("FEDSIM_DATA_DIR")
    if not root or not (Path(root) / "fashion-mnist").is_dir():
        pytest.skip("needs the offline dataset folder (FEDSIM_DATA_DIR)")
    return Path(root)


@pytest.fixture
def make_method():
    """A method's server half as the engine builds it: make_method(sizes, "strategy.name=x", ...)."""
    import numpy as np

    from fedsim.config import load_config
    from fedsim.method import RunInfo
    from fedsim.registry import build_method

    def make(sizes, *overrides, param_names=("w",)):
        config = load_config(None, list(overrides))
        run = RunInfo(list(param_names), np.asarray(sizes), config.client, config.experiment.seed)
        return build_method(config, run)

    return make
