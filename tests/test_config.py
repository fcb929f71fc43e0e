from pathlib import Path

import pytest

from fedsim.config import load_config, parse_override
from fedsim.errors import ConfigError
from fedsim.registry import check_config

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"


def test_quickstart_spec_loads_with_its_values():
    config = load_config(QUICKSTART)
    assert config.experiment.name == "quickstart"
    assert config.data.dataset == "digits" and config.data.num_clients == 20
    assert config.data.partition.kind == "dirichlet" and config.data.partition.alpha == 0.5
    assert config.strategy.clients_per_round == 10
    check_config(config)


def test_overrides_are_typed_and_nested():
    config = load_config(QUICKSTART, ["experiment.seed=7", "client.lr=0.5",
                                      "strategy.name=fedprox", "strategy.mu=0.1",
                                      "model.hidden=[32, 16]"])
    assert config.experiment.seed == 7 and config.client.lr == 0.5
    assert config.strategy.name == "fedprox" and config.strategy.params == {"mu": 0.1}
    assert config.model.hidden == [32, 16]
    assert parse_override("data.dataset=digits") == (["data", "dataset"], "digits")


def test_data_root_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSIM_DATA_DIR", str(tmp_path))
    assert load_config(None).data.root == tmp_path
    assert load_config(None, [f"data.root='{tmp_path / 'x'}'"]).data.root == tmp_path / "x"


@pytest.mark.parametrize("override, expected", [
    ("data.num_client=3", "unknown key 'data.num_client'; did you mean 'num_clients'?"),
    ("experimnt.seed=1", "unknown key 'experimnt'"),
    ("data.partition.alpha=-1", "data.partition.alpha = -1: Input should be greater than 0"),
    ("experiment.rounds='many'", "experiment.rounds = 'many'"),
    ("engine.backend=spark", "engine.backend = 'spark'"),
])
def test_bad_keys_and_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, expected", [
    ("strategy.name=fedx", "unknown strategy 'fedx' in strategy.name; known: ditto, fairfed, fedadam"),
    ("data.dataset=mnist",
     "unknown dataset 'mnist' in data.dataset; known: adult, cifar10, cifar100, digits, "
     "fashion-mnist, german, synthetic"),
    ("model.name=vit", "unknown model 'vit' in model.name"),
    ("strategy.mu=0.1", "unknown key 'strategy.mu' for strategy 'fedavg'"),
])
def test_unknown_names_fail_before_running(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        check_config(load_config(QUICKSTART, [override]))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\nname=1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
