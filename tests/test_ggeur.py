"""GGEUR's statistics: pooling equals the concatenated data, sampling has the pooled covariance,
and the statistics phase sends nothing per example."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.config import load_config
from fedsim.data.federation import build_federation
from fedsim.data.sources import load_source
from fedsim.errors import ConfigError
from fedsim.registry import check_config
from fedsim.runner import run_experiment
from strategies.ggeur import (
    augment,
    class_statistics,
    geometric_shape,
    pool_class_statistics,
    pool_sums,
    sample_around,
    shapes_from_statistics,
)


def clients_of_one_class(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(rng.normal(size=4) * 3, rng.uniform(0.5, 2.0), size=(n, 4)) for n in (3, 40, 17, 1)]


@pytest.mark.parametrize("seed", range(3))
def test_pooled_covariance_is_the_covariance_of_the_concatenated_data(seed):
    parts = clients_of_one_class(seed)
    counts = np.array([len(p) for p in parts])
    means = np.stack([p.mean(axis=0) for p in parts])
    covariances = np.stack([np.cov(p, rowvar=False, bias=True) for p in parts])
    mean, covariance = pool_class_statistics(counts, means, covariances)
    everything = np.vstack(parts)
    np.testing.assert_allclose(mean, everything.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(covariance, np.cov(everything, rowvar=False, bias=True), atol=1e-12)
    # the same from summed (count, sum, outer-product sum) statistics
    summed = [sum(s) for s in zip(*(class_statistics(p, np.zeros(len(p), int), 1) for p in parts),
                                  strict=True)]
    mean2, covariance2 = pool_sums(summed[0][0], summed[1][0], summed[2][0])
    np.testing.assert_allclose(mean2, mean, atol=1e-12)
    np.testing.assert_allclose(covariance2, covariance, atol=1e-10)


def test_samples_around_a_point_have_the_pooled_covariance():
    parts = clients_of_one_class(5)
    _, covariance = pool_class_statistics(
        np.array([len(p) for p in parts]), np.stack([p.mean(axis=0) for p in parts]),
        np.stack([np.cov(p, rowvar=False, bias=True) for p in parts]))
    values, vectors = geometric_shape(covariance)
    point = np.array([1.0, -2.0, 0.5, 3.0])
    rng = np.random.default_rng(0)
    draws = sample_around(np.tile(point, (200_000, 1)), values, vectors, rng)
    np.testing.assert_allclose(draws.mean(axis=0), point, atol=0.05 * np.sqrt(values.max()))
    error = np.linalg.norm(np.cov(draws, rowvar=False) - covariance) / np.linalg.norm(covariance)
    assert error < 0.02
    squared = sample_around(np.tile(point, (200_000, 1)), values, vectors, rng, scaling="lambda")
    expected = vectors @ np.diag(values**2) @ vectors.T  # the paper figure's lambda scaling
    assert np.linalg.norm(np.cov(squared, rowvar=False) - expected) / np.linalg.norm(expected) < 0.02


def test_statistics_phase_sends_nothing_per_example():
    rng = np.random.default_rng(1)
    for n in (10, 1000):
        x, y = rng.normal(size=(n, 6)), rng.integers(0, 3, n)
        sent = class_statistics(x, y, num_classes=3)
        assert [a.shape for a in sent] == [(3,), (3, 6), (3, 6, 6)]  # independent of n
        assert sent[0].sum() == n


def test_augment_tops_every_class_up_and_keeps_the_originals():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(13, 3)).astype(np.float32)
    y = np.array([0] * 10 + [1] * 3)
    shapes = {c: geometric_shape(np.eye(3) * 0.1) for c in (0, 1, 2)}
    new_x, new_y = augment(x, y, shapes, target=20, rng=rng)
    assert np.bincount(new_y).tolist() == [20, 20]  # class 2 is absent and has no prototype
    np.testing.assert_array_equal(new_x[:13], x)
    prototypes = {2: np.array([[5.0, 5.0, 5.0]])}
    with_protos_x, with_protos_y = augment(x, y, shapes, 20, rng, prototypes=prototypes)
    assert np.bincount(with_protos_y).tolist() == [20, 20, 20]
    assert np.abs(with_protos_x[with_protos_y == 2].mean(axis=0) - 5.0).max() < 0.5


def test_prototype_draws_share_equally_between_the_own_examples_and_each_other_domain():
    # the reference's multi-domain top-up draws as many samples around each other domain's
    # prototype as around the client's own examples together (Digits: 500 + 3 x 500)
    rng = np.random.default_rng(4)
    own = np.zeros((40, 2), np.float32)  # tiny covariance: every draw stays at its centre
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]])
    shapes = {0: geometric_shape(np.eye(2) * 1e-6)}
    shares = {}
    for rule in ("domain", "center"):
        new_x, _ = augment(own, np.zeros(40, np.int64), shapes, 2040, rng, prototypes={0: centres},
                           prototype_draws=rule)
        drawn = new_x[40:]
        shares[rule] = float((np.linalg.norm(drawn, axis=1) > 5).mean())  # around another domain
    assert abs(shares["domain"] - 3 / 4) < 0.03
    assert abs(shares["center"] - 3 / 43) < 0.03  # each prototype one more centre among 43


def test_a_run_with_ggeur_tops_every_class_up_to_its_global_count(tmp_path):
    overrides = ["data.embedding=identity", "model.name=logreg", "data.num_clients=4",
                 "strategy.clients_per_round=4", "data.partition.alpha=0.5", "data.partition.min_size=5",
                 "experiment.rounds=1", "engine.backend=inprocess", "ggeur.enabled=true",
                 f"output.run_dir='{tmp_path}'"]
    run_experiment(load_config(None, overrides))
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    fed = build_federation(load_config(None, overrides).data, 0)
    global_counts = np.bincount(np.concatenate([fed.dataset.y_train[i] for i in fed.train_idx]), minlength=10)
    for cid, size in clients[clients["round"] == 1].set_index("client_id")["num_examples"].items():
        held = np.bincount(fed.dataset.y_train[fed.train_idx[cid]], minlength=10) > 0
        assert size == global_counts[held].sum()  # each class it holds, at the global count
    labels = np.array([0] * 5 + [1] * 9)
    counts, sums, outers = class_statistics(np.random.default_rng(0).normal(size=(14, 3)), labels, 2)
    report = {0: {"counts": counts, "sums": sums, "outers": outers}}
    for rule, expected in (("global", [5, 9]), ("share", [2, 3])):  # share: ceil(count / 4 clients)
        shared = shapes_from_statistics(report, 4, None, False, target_rule=rule)
        np.testing.assert_array_equal(shared["target"], expected)


def test_a_run_with_ggeur_tops_up_clients_and_records_the_statistics_cost(tmp_path):
    overrides = ["data.embedding=identity", "model.name=logreg", "data.num_clients=6",
                 "strategy.clients_per_round=6", "data.partition.alpha=0.1", "data.partition.min_size=5",
                 "experiment.rounds=2", "engine.backend=inprocess", "ggeur.enabled=true",
                 "ggeur.target=30", f"output.run_dir='{tmp_path}'"]
    run_experiment(load_config(None, overrides))
    cost = json.loads((tmp_path / "setup.json").read_text())
    assert cost["ggeur"]["clients"] == 6 and cost["bytes_exchanged"] > 6 * 10 * 64 * 64 * 8
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    fed = build_federation(load_config(None, overrides).data, 0)
    sizes = clients[clients["round"] == 1].set_index("client_id")["num_examples"]
    for cid, size in sizes.items():
        own = np.bincount(fed.dataset.y_train[fed.train_idx[cid]], minlength=10)
        held = own > 0  # without prototypes, classes a client lacks are not generated
        assert size == np.maximum(own[held], 30).sum()


def test_ggeur_needs_embeddings_and_loads_a_frozen_encoder(tmp_path):
    with pytest.raises(ConfigError, match="ggeur works on embeddings"):
        check_config(load_config(None, ["ggeur.enabled=true"]))
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    torch.save(encoder, tmp_path / "encoder.pt")
    fed = build_federation(load_config(None, [f"data.embedding='{tmp_path / 'encoder.pt'}'"]).data, 0)
    assert fed.input_shape == (5,)
    with torch.no_grad():
        expected = encoder(torch.as_tensor(load_source(load_config(None).data, 0).x_train[:3])).numpy()
    np.testing.assert_allclose(fed.dataset.x_train[:3], expected, atol=1e-6)


def test_warmup_embeddings_train_an_encoder_then_ggeur_runs_on_its_features(tmp_path):
    config = load_config(None, [
        "data.embedding=warmup", "data.warmup.model=mlp", "data.warmup.rounds=3", "model.hidden=[24]",
        "model.name=logreg", "data.num_clients=6", "strategy.clients_per_round=6",
        "data.partition.min_size=5", "experiment.rounds=3", "engine.backend=inprocess",
        "client.local_epochs=3", "client.lr=0.2", f"output.dir='{tmp_path / 'runs'}'",
        "ggeur.enabled=true", f"output.run_dir='{tmp_path}'"])
    rounds = run_experiment(config).rounds
    (warm_dir,) = (tmp_path / "runs" / "warmups").iterdir()
    warmup = json.loads((warm_dir / "summary.json").read_text())
    assert warmup["rounds"] == 3 and warmup["final_accuracy"] > 0.6
    encoder = torch.load(warm_dir / "encoder.pt", weights_only=False)
    assert not any(p.requires_grad for p in encoder.parameters())
    used = json.loads((tmp_path / "config.json").read_text())["data"]["embedding"]
    assert used == str((warm_dir / "encoder.pt").resolve())
    again = load_config(None, [*config_overrides(config), f"output.run_dir='{tmp_path / 'second'}'"])
    started = (warm_dir / "summary.json").stat().st_mtime
    run_experiment(again)  # the same warm-up is reused, not trained again
    assert (warm_dir / "summary.json").stat().st_mtime == started
    assert len(list((tmp_path / "runs" / "warmups").iterdir())) == 1
    fed = build_federation(load_config(None, [f"data.embedding='{used}'", "data.num_clients=6",
                                              "data.partition.min_size=5"]).data, 0)
    assert fed.input_shape == (24,)  # the warm-up MLP's hidden layer
    assert rounds["test_accuracy"].iloc[-1] > 0.5


def config_overrides(config) -> list[str]:
    """The spec's non-default keys as `key=value` overrides (to re-run it elsewhere)."""
    return ["data.embedding=warmup", "data.warmup.model=mlp", "data.warmup.rounds=3", "model.hidden=[24]",
            "model.name=logreg", "data.num_clients=6", "strategy.clients_per_round=6",
            "data.partition.min_size=5", "experiment.rounds=1", "engine.backend=inprocess",
            "client.local_epochs=3", "client.lr=0.2", f"output.dir='{config.output.dir}'",
            "ggeur.enabled=false"]


def test_a_new_target_in_the_same_process_rebuilds_the_top_ups(tmp_path):
    base = ["data.embedding=identity", "model.name=logreg", "data.num_clients=4",
            "strategy.clients_per_round=4", "data.partition.min_size=5", "experiment.rounds=1",
            "engine.backend=inprocess", "ggeur.enabled=true"]
    sizes = []
    for target in (20, 60):
        run_dir = tmp_path / str(target)
        run_experiment(load_config(None, [*base, f"ggeur.target={target}", f"output.run_dir='{run_dir}'"]))
        sizes.append(pd.read_parquet(run_dir / "clients.parquet")["num_examples"].sum())
    assert sizes[1] > sizes[0]  # not the first run's cached augmentation
