"""Bring your own: a user project's model, dataset and method from a spec and from the Python
API, and one clear error (exit code 2, before round 1) for every kind of plugin mistake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fedsim
from fedsim.cli import app
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lenet-digits"
QUICKSTART = ROOT / "experiments" / "quickstart.toml"
FAST = ["engine.backend=inprocess", "experiment.rounds=2"]


def final_model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "model.npz") as data:
        return {k: data[k] for k in data.files}


def test_example_project_from_its_spec_equals_the_python_api_with_objects(tmp_path, monkeypatch):
    four = ["engine.backend=inprocess", "experiment.rounds=4"]
    spec_file = EXAMPLE / "experiment.toml"
    spec = run_experiment(load_config(spec_file, [*four, f"output.run_dir={tmp_path / 'a'}"]))
    assert spec.rounds["test_accuracy"].iloc[-1] > 0.15  # 10 classes: chance is 0.1
    assert spec.rounds["trimmed_clients"].iloc[-1] == 4  # the method's own metric: 20% of 10, twice
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from data import shifted_digits
    from model import lenet
    from strategy import TrimmedMean

    api = fedsim.run(EXAMPLE / "experiment.toml", *four, f"output.run_dir={tmp_path / 'b'}",
                     strategy={"name": TrimmedMean}, model={"name": lenet},
                     data={"dataset": shifted_digits})
    a, b = final_model(spec.run_dir), final_model(api.run_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_python_api_takes_a_dict_and_objects_defined_in_the_caller(tmp_path):
    from torch import nn

    def tiny(input_shape, num_classes, spec):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    config = fedsim.experiment({"experiment": {"rounds": 2}, "engine": {"backend": "inprocess"},
                                "output": {"run_dir": str(tmp_path)}}, model={"name": tiny})
    assert config.model.name.startswith("direct:")  # defined in a function: this process only
    summary = fedsim.run(config)
    assert summary.rounds["round"].tolist() == [0, 1, 2] and summary.run_dir == tmp_path
    with pytest.raises(ConfigError, match="model.name was passed from Python .* Ray workers cannot"):
        fedsim.run(config, "engine.backend=ray")  # refused before Ray starts


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


BAD_PLUGINS = {
    "module that does not import": (
        ["strategy.name=no_such_package.methods:Mine"],
        "strategy.name = 'no_such_package.methods:Mine': module 'no_such_package.methods' does not import"),
    "missing attribute": (
        [f"strategy.name={EXAMPLE / 'strategy.py'}:Nope"], "has no attribute 'Nope'"),
    "not a method": (
        [f"strategy.name={EXAMPLE / 'model.py'}:lenet"], "is not a subclass of fedsim.method.Method"),
    "bad method parameter": (
        [f"strategy.name={EXAMPLE / 'strategy.py'}:TrimmedMean", "strategy.trim=0.9"],
        "strategy.trim = 0.9: Input should be less than 0.5"),
    "unknown method parameter": (
        [f"strategy.name={EXAMPLE / 'strategy.py'}:TrimmedMean", "strategy.trimm=0.1"],
        "unknown key 'strategy.trimm' for strategy 'trimmed-mean' (its parameters: trim)"),
    "misspelled objective parameter": (
        ["client.objectives={proximal = {m = 0.1}}"],
        "unknown key 'client.objectives.proximal.m' for local objective 'proximal' (its parameters: mu)"),
    "unknown objective": (["client.objectives={proxmal = {mu = 0.1}}"], "unknown local objective 'proxmal'"),
    "parity without a sensitive attribute": (
        ["client.objectives={parity = {mu = 0.5}}"],
        "local objective 'parity' need(s) a dataset with a sensitive attribute"),
    "fairfed without a sensitive attribute": (
        ["strategy.name=fairfed"], "strategy 'fairfed' need(s) a dataset with a sensitive attribute"),
    "model key a built-in model lacks": (["model.channels=[3]"], "unknown key(s) ['model.channels']"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_bad_plugins_stop_before_round_one_with_one_clear_error(case, tmp_path):
    overrides, message = BAD_PLUGINS[case]
    args = ["run", str(QUICKSTART), *[a for o in [*overrides, *FAST] for a in ("--set", o)],
            "--set", f"output.run_dir={tmp_path / 'run'}"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    assert out.output.strip().splitlines()[-1].startswith("error: ") and message in out.output
    assert not (tmp_path / "run" / "rounds.parquet").exists()


PLUGIN_FILES = {
    "model returns no module": ("model.name", "def build(shape, classes, spec):\n    return 3\n",
                                "returned int, not a torch.nn.Module"),
    "model raises": ("model.name", "def build(shape, classes, spec):\n    raise KeyError('width')\n",
                     "failed to build a model for inputs (1, 8, 8) and 10 classes: KeyError"),
    "model file does not import": ("model.name", "def build(:\n", "does not import: SyntaxError"),
    "dataset returns the wrong thing": ("data.dataset", "def build():\n    return [1, 2]\n",
                                        "must return an ArrayDataset or a dict with x_train"),
    "fairfed on a dataset without groups": (
        "data.dataset",
        "import numpy as np\ndef build():\n    x, y = np.zeros((400, 3)), np.arange(400) % 2\n"
        "    return dict(x_train=x, y_train=y, x_test=x, y_test=y)\n",
        "strategy 'fairfed' need(s) a dataset with a sensitive attribute"),
    "dataset splits of unequal length": (
        "data.dataset", "import numpy as np\ndef build():\n    x = np.zeros((20, 3))\n"
        "    return dict(x_train=x, y_train=np.zeros(19), x_test=x, y_test=np.zeros(20))\n",
        "x and y of a split differ in length"),
}


@pytest.mark.parametrize("case", sorted(PLUGIN_FILES))
def test_plugin_files_that_misbehave_stop_before_round_one(case, tmp_path):
    key, source, message = PLUGIN_FILES[case]
    path = write(tmp_path, f"plugin_{abs(hash(case))}.py", source)
    fairfed = ["--set", "strategy.name=fairfed", "--set", "data.partition.kind=iid"]
    extra = fairfed if "fairfed" in case else []
    out = CliRunner().invoke(app, ["run", str(QUICKSTART), "--set", f"{key}={path}:build", *extra,
                                   *[a for o in FAST for a in ("--set", o)],
                                   "--set", f"output.run_dir={tmp_path / 'run'}"])
    assert out.exit_code == 2, out.output
    assert message in out.output and f"{key} = '{path}:build'" in out.output
    assert not (tmp_path / "run" / "rounds.parquet").exists()


def test_objects_from_plugin_files_are_passed_on_by_their_file():
    from fedsim.plugins import load_object, register

    name = f"{EXAMPLE / 'strategy.py'}:TrimmedMean"
    assert register(load_object(name, "strategy.name")) == name  # importable in any process


def test_file_plugins_in_a_spec_are_relative_to_the_spec(tmp_path):
    config = load_config(EXAMPLE / "experiment.toml")
    assert config.model.name == f"{EXAMPLE / 'model.py'}:lenet"
    assert config.model.model_extra == {"channels": [6, 16]}


@pytest.mark.slow
def test_example_project_on_ray_with_two_workers_equals_the_in_process_run(tmp_path, monkeypatch):
    import torch

    spec = EXAMPLE / "experiment.toml"  # engine.workers = 2
    monkeypatch.chdir(EXAMPLE)  # the strategy by module name from the working directory, the
    module = "strategy.name=strategy:TrimmedMean"  # model and dataset by file
    on_ray = run_experiment(load_config(spec, ["experiment.rounds=2", module,
                                               f"output.run_dir={tmp_path / 'ray'}"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker (one CPU each): the same convolution kernels
    try:
        plain = run_experiment(load_config(spec, ["experiment.rounds=2", "engine.backend=inprocess",
                                                  f"output.run_dir={tmp_path / 'plain'}"]))
    finally:
        torch.set_num_threads(threads)
    a, b = final_model(on_ray.run_dir), final_model(plain.run_dir)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    np.testing.assert_allclose(on_ray.rounds["test_accuracy"], plain.rounds["test_accuracy"], atol=1e-6)


def test_deployed_plugin_files_are_named_inside_the_app_bundle():
    from fedsim.deploy.serverapp import config_from_run_config
    from fedsim.models import build_model
    from fedsim.plugins import APP_ROOT

    config = config_from_run_config({"experiment": "examples/lenet-digits/experiment.toml"})
    assert config.model.name == "@app/examples/lenet-digits/model.py:lenet"  # each node's own copy
    assert config.strategy.name == "@app/examples/lenet-digits/strategy.py:TrimmedMean"
    assert (APP_ROOT / "examples" / "lenet-digits" / "model.py").is_file()
    assert build_model(config.model, (1, 12, 12), 10, seed=0)[0].out_channels == 6
    outside = config_from_run_config({"experiment": str(QUICKSTART), "overrides": "model.name=/tmp/m.py:f"})
    assert outside.model.name == "/tmp/m.py:f"  # outside the bundle: left as it is


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "shards"])
def test_a_users_dataset_goes_through_every_label_partition(kind):
    from fedsim.data.federation import build_federation

    config = load_config(EXAMPLE / "experiment.toml", [f"data.partition.kind={kind}", "data.num_clients=8"])
    federation = build_federation(config.data, seed=0)
    held = np.concatenate([*federation.train_idx, *federation.test_idx])
    assert len(np.unique(held)) == len(held)  # every example with one client at most
    assert federation.input_shape == (1, 12, 12) and federation.num_classes == 10
    if kind in ("iid", "dirichlet"):  # these use every training example
        assert len(held) == len(federation.dataset.y_train)
