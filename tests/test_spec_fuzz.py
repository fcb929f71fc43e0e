"""A property test over the experiment spec: random overrides (wrong types, out-of-range values,
unknown keys and names) give a valid config or one clear ConfigError, never another exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedsim.config import ExperimentConfig, load_config
from fedsim.errors import FedsimError
from fedsim.registry import check_config

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += dotted_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


KEYS = dotted_keys(ExperimentConfig) + [
    "data.num_client", "strategy.mu", "strategy.q", "strategy.beta", "strategy.wrap", "model.channels",
    "client.objectives.proximal.mu", "client.objectives.parity.mu", "client.objectives.nope.x",
    "experiment", "data.partition.alpha.x"]
VALUES = st.one_of(
    st.sampled_from(["-1", "0", "1", "0.5", "1e9", "-1e-9", "nan", "inf", "true", "'x'", "''", "[]",
                     "[1, 2]", "{a = 1}", "{mu = 0.1}", "fedx", "fedprox", "flwr:Nope", "flwr:FedMedian",
                     "flwr:DifferentialPrivacyServerSideFixedClipping", "fairfed", "moon", "adult",
                     "cnn", "resnet", "logreg", "missing.py:Thing", "no_such.module:Thing", "iid",
                     "synergy", "adam", "[0, 1]", "{parity = {mu = 1}}", "'1.5'"]),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_random_overrides_give_a_valid_config_or_a_clear_error(overrides):
    texts = [f"{key}={value}" for key, value in overrides]
    try:
        check_config(load_config(QUICKSTART, texts))
    except FedsimError as exc:
        assert str(exc) and "Traceback" not in str(exc)
