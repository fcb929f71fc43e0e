"""Central pretraining on held-out rows, and runs that start from its weights or its encoder."""

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import load_config
from fedsim.data.federation import build_federation, holdout_split
from fedsim.data.sources import load_source
from fedsim.errors import ConfigError
from fedsim.runner import run_experiment

QUICK = ["data.holdout=0.3", "data.num_clients=6", "strategy.clients_per_round=3", "engine.backend=inprocess"]


def test_the_held_out_rows_never_reach_a_client():
    config = load_config(None, ["data.holdout=0.25"])
    for seed in (0, 1):  # digits' own train/test split follows the seed, so the held-out rows too
        full = load_source(config.data, seed)
        fed = build_federation(config.data, seed)
        _, held = holdout_split(full, 0.25)
        rows = [x.tobytes() for x in full.x_train]
        unique = {r for r in rows if rows.count(r) == 1}  # digits has a few identical images
        clients = {x.tobytes() for i in range(fed.num_clients) for x in fed.client_data(i).x_train}
        assert not clients & {x.tobytes() for x in held.x_train} & unique
        assert len(fed.dataset.y_train) + len(held.y_train) == len(full.y_train)


def test_the_held_out_rows_are_the_same_for_every_seed_where_the_test_split_is_fixed(data_dir):
    adult = load_source(load_config(None, ["data.dataset=adult"]).data, 0)  # its own test split
    seeds = [holdout_split(load_source(load_config(None, ["data.dataset=adult"]).data, s), 0.1)[1].x_train
             for s in (0, 1)]
    np.testing.assert_array_equal(seeds[0], seeds[1])
    assert len(seeds[0]) == pytest.approx(0.1 * len(adult.y_train), abs=2)


def test_pretrain_then_fine_tune_starts_from_the_pretrained_model(tmp_path):
    out = tmp_path / "pre.pt"
    result = CliRunner().invoke(app, ["pretrain", "experiments/quickstart.toml", "--out", str(out),
                                      "--epochs", "20", *sum((["--set", k] for k in QUICK), [])])
    assert result.exit_code == 0, result.output
    pretrained = float(result.output.split("test accuracy ")[1].split(",")[0])
    assert pretrained > 0.5 and (tmp_path / "pre-encoder.pt").is_file()
    config = load_config(None, [*QUICK, f"model.init={out}", "experiment.rounds=1",
                                f"output.dir={tmp_path / 'runs'}"])
    rounds = run_experiment(config).rounds
    assert rounds.loc[rounds["round"] == 0, "test_accuracy"].item() == pytest.approx(pretrained, abs=1e-4)
    # the encoder serves as a frozen embedding for a linear head (GGEUR's setting)
    head = load_config(None, [*QUICK, f"data.embedding={tmp_path / 'pre-encoder.pt'}", "model.name=logreg",
                              "experiment.rounds=5", "client.local_epochs=3",
                              f"output.dir={tmp_path / 'runs'}"])
    assert build_federation(head.data, 0).input_shape == (128,)  # the MLP's hidden layer
    assert run_experiment(head).rounds["test_accuracy"].iloc[-1] > 0.6


def test_mistakes_are_one_clear_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", "experiments/quickstart.toml", "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "set data.holdout" in result.output
    with pytest.raises(ConfigError, match="no such file"):
        run_experiment(load_config(None, [*QUICK, f"model.init={tmp_path / 'none.pt'}"]))
    np.savez(tmp_path / "wrong.npz", w=np.zeros(3))
    with pytest.raises(ConfigError, match="does not fit the model.*missing"):
        run_experiment(load_config(None, [*QUICK, f"model.init={tmp_path / 'wrong.npz'}"]))


def test_one_spec_serves_pretraining_and_fine_tuning(tmp_path):
    """Without --out, pretrain writes the file the spec's model.init names; another target
    with model.init set is refused (pretraining starts from the model's own initialization)."""
    init = tmp_path / "spec-init.pt"
    sets = sum((["--set", k] for k in [*QUICK, f"model.init={init}"]), [])
    result = CliRunner().invoke(app, ["pretrain", "experiments/quickstart.toml", "--epochs", "2", *sets])
    assert result.exit_code == 0, result.output
    assert init.is_file() and f"weights: {init}" in result.output.replace("\n", "")
    other = CliRunner().invoke(app, ["pretrain", "experiments/quickstart.toml",
                                     "--out", str(tmp_path / "b.pt"), *sets])
    assert other.exit_code == 2 and "is not the output file" in other.output
