"""Every Python name and command the README shows works as written."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

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
