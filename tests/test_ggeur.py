"""GGEUR's statistics: pooling equals the concatenated data, sampling has the pooled covariance,
and the statistics phase sends nothing per example."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.ggeur import (
    augment,
    class_statistics,
    geometric_shape,
    pool_class_statistics,
    pool_sums,
    sample_around,
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
