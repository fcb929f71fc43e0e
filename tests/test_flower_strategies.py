"""Flower's own message-API strategies on fedsim's engine (`strategy.name = "flwr:<Strategy>"`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.method import ClientResult, RoundResult
from fedsim.registry import check_config
from fedsim.runner import run_experiment

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
FAST = ["engine.backend=inprocess", "experiment.rounds=3"]
DP = "strategy.name=flwr:DifferentialPrivacyServerSideFixedClipping"


def final_model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "model.npz") as data:
        return {k: data[k] for k in data.files}


def test_flower_fedavg_equals_fedsim_fedavg_on_the_quickstart(tmp_path):
    runs = {name: run_experiment(load_config(QUICKSTART, [*FAST, f"strategy.name={name}",
                                                          f"output.run_dir={tmp_path / name}"]))
            for name in ("fedavg", "flwr:FedAvg")}
    ours, flowers = (final_model(runs[n].run_dir) for n in ("fedavg", "flwr:FedAvg"))
    for key in ours:
        np.testing.assert_allclose(flowers[key], ours[key], atol=1e-6)
    np.testing.assert_allclose(runs["flwr:FedAvg"].rounds["test_accuracy"],
                               runs["fedavg"].rounds["test_accuracy"], atol=1e-6)


def client_round(models: list[dict[str, np.ndarray]], sizes: list[float]) -> RoundResult:
    clients = [ClientResult(cid, {"num_examples": n}, {"model": m})
               for cid, (m, n) in enumerate(zip(models, sizes, strict=True))]
    mean = {k: sum(n * m[k] for m, n in zip(models, sizes, strict=True)) / sum(sizes) for k in models[0]}
    return RoundResult(clients=clients, means={"model": mean})


def test_flower_fedmedian_is_the_coordinatewise_median_of_the_client_models(make_method):
    rng = np.random.default_rng(0)
    models = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
              for _ in range(5)]
    method = make_method([10] * 5, "strategy.name=flwr:FedMedian", param_names=("w", "b"))
    current = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    new, _ = method.aggregate(1, current, client_round(models, [10, 20, 30, 40, 50]))
    for key in current:
        np.testing.assert_allclose(new[key], np.median([m[key] for m in models], axis=0), rtol=1e-6)
        assert new[key].dtype == np.float32


def test_flower_krum_picks_the_client_closest_to_its_neighbours(make_method):
    honest = [{"w": np.full(3, v, np.float32)} for v in (1.0, 1.1, 0.9, 1.05)]
    outlier = {"w": np.full(3, 50.0, np.float32)}
    method = make_method([10] * 5, "strategy.name=flwr:Krum", "strategy.num_malicious_nodes=1")
    new, _ = method.aggregate(1, {"w": np.zeros(3, np.float32)}, client_round([*honest, outlier], [10] * 5))
    assert any(np.array_equal(new["w"], m["w"]) for m in honest)  # Krum selects one honest model


@pytest.mark.parametrize("name, extra", [
    ("flwr:FedMedian", []),
    ("flwr:FedTrimmedAvg", ["strategy.beta=0.2"]),
    ("flwr:Krum", ["strategy.num_malicious_nodes=1"]),
    ("flwr:DifferentialPrivacyServerSideFixedClipping",
     ["strategy.noise_multiplier=0.01", "strategy.clipping_norm=5.0"]),
])
def test_flower_strategies_run_on_the_engine(name, extra, tmp_path):
    summary = run_experiment(load_config(QUICKSTART, [*FAST, f"strategy.name={name}", *extra,
                                                      f"output.run_dir={tmp_path}"]))
    assert summary.rounds["num_clients"].iloc[-1] == 10
    assert summary.rounds["test_accuracy"].iloc[-1] > 0.3  # it learns (chance: 0.1)


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=flwr:FedMedianX"], "Flower has no such strategy"),
    (["strategy.name=flwr:FedTrimmedAvg", "strategy.betta=0.2"], "unknown key(s) ['strategy.betta']"),
    (["strategy.name=flwr:FedAvg", "strategy.fraction_train=0.5"], "fedsim's to set"),
    (["strategy.name=flwr:DifferentialPrivacyServerSideFixedClipping"], "noise_multiplier"),
    ([DP, "strategy.noise_multiplier=1", "strategy.clipping_norm=1", "strategy.num_sampled_clients=5"],
     "fedsim's to set"),
    (["strategy.name=flwr:DifferentialPrivacyServerSideFixedClipping", "strategy.noise_multiplier=1",
      "strategy.clipping_norm=1", "strategy.wrap=Nope"], "Flower has no such strategy"),
])
def test_bad_flower_strategy_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        check_config(load_config(QUICKSTART, overrides))



def test_dp_wrapper_clips_trainable_updates_with_equal_weights_and_averages_buffers(make_method):
    current = {"w": np.zeros(4, np.float32), "bn.num_batches_tracked": np.array(0, np.int64)}
    models = [{"w": np.full(4, v, np.float32), "bn.num_batches_tracked": np.array(40, np.int64)}
              for v in (0.1, 3.0)]  # update norms 0.2 and 6.0
    method = make_method([10, 30], DP, "strategy.noise_multiplier=0", "strategy.clipping_norm=1.0")
    new, _ = method.aggregate(1, current, client_round(models, [10, 30]))
    clipped = [np.full(4, 0.1), np.full(4, 3.0) / 6.0]  # the second update scaled to norm 1
    np.testing.assert_allclose(new["w"], np.mean(clipped, axis=0), rtol=1e-5)  # equal weights
    assert new["bn.num_batches_tracked"] == 40  # a buffer: the FedAvg mean, neither clipped nor noised
    assert method.flower.num_sampled_clients == 2  # the clients that replied


def test_dp_noise_is_seeded_per_round_and_calibrated_to_the_replies(make_method):
    current = {"w": np.zeros(1000, np.float32)}
    rng = np.random.default_rng(0)  # tiny updates (Flower's clipping divides by their norm)
    models = [{"w": rng.normal(0, 1e-4, 1000).astype(np.float32)} for _ in range(4)]
    noisy = [DP, "strategy.noise_multiplier=2.0", "strategy.clipping_norm=0.5"]
    first = make_method([10] * 4, *noisy).aggregate(3, current, client_round(models, [10] * 4))[0]["w"]
    again = make_method([10] * 4, *noisy).aggregate(3, current, client_round(models, [10] * 4))[0]["w"]
    other = make_method([10] * 4, *noisy).aggregate(4, current, client_round(models, [10] * 4))[0]["w"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.1)  # sigma * clip / m, m = 4 replies


def test_only_strategies_that_work_on_the_server_alone_are_offered():
    from strategies.flower import flower_names

    names = flower_names()
    assert {"FedAvg", "FedMedian", "Krum", "DifferentialPrivacyServerSideFixedClipping"} <= set(names)
    assert not {"FedProx", "QFedAvg", "DifferentialPrivacyClientSideFixedClipping"} & set(names)
    with pytest.raises(ConfigError, match="Flower has no such strategy"):
        check_config(load_config(QUICKSTART, ["strategy.name=flwr:FedProx"]))
