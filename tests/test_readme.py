"""Every Python name and command the README shows works as written."""

from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fedsim.config import ExperimentConfig
from fedsim.method import ClientResult, RoundResult

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def resolve(dotted: str):
    """Import the longest module prefix of `dotted`, then follow the attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_dotted_fedsim_name_in_the_readme_imports():
    names = sorted(set(re.findall(r"`(fedsim(?:\.[A-Za-z_]+)+)", README)))
    assert len(names) >= 6
    for name in names:
        assert resolve(name) is not None, name


def is_config_key(dotted: str) -> bool:
    """Whether `a.b.c` names a field of the experiment spec (or a key a section lets users add)."""
    model = ExperimentConfig
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return False
        if part not in fields:
            return model.model_config.get("extra") == "allow"
        annotation = fields[part].annotation
        model = next((t for t in (annotation, *typing.get_args(annotation)) if hasattr(t, "model_fields")),
                     None)
    return True


def test_every_config_key_in_the_readme_exists():
    names = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)(?: ?=[^`]*)?`", README))
    keys = sorted(n for n in names if n.split(".")[0] in ExperimentConfig.model_fields)
    assert "output.checkpoint_every" in keys and len(keys) > 20
    assert [k for k in keys if not is_config_key(k)] == []
    assert not is_config_key("output.checkpoint_evry") and not is_config_key("client.lr.x")


def test_the_readme_method_example_runs_as_written():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "class TrimmedMean" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - the README's own example
    method = namespace["TrimmedMean"]({"trim": 0.25})
    models = [np.array([v], np.float32) for v in (0.0, 1.0, 2.0, 100.0)]
    result = RoundResult([ClientResult(i, {"num_examples": 1.0}, {"model": {"w": m}})
                          for i, m in enumerate(models)])
    new, metrics = method.aggregate(1, {"w": np.zeros(1, np.float32)}, result)
    assert new["w"][0] == 1.5 and metrics == {"trimmed": 2.0}  # mean of 1 and 2


def test_fedsim_strategies_lists_fedsims_and_flowers():
    from fedsim.cli import app

    out = CliRunner().invoke(app, ["strategies"])
    assert out.exit_code == 0
    for name in ("fedavg", "scaffold", "fednova", "moon", "flwr:FedMedian", "flwr:Krum",
                 "flwr:DifferentialPrivacyServerSideFixedClipping", "[ggeur]"):
        assert name in out.output
