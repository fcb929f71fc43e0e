"""Property tests of every partitioner, plus the quantity skew, long tail and fairness splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.config import PartitionSection
from fedsim.data.partition import long_tail, partition_labels, quantity_sizes
from fedsim.data.stats import summarize
from fedsim.errors import DataError

LABEL_KINDS = ["iid", "dirichlet", "pathological", "shards"]
GROUP_KINDS = ["sensitive", "heterogeneity", "synergy"]
PROPERTIES = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """A labelled set (with binary groups), a client count and a partition spec."""
    kind = draw(st.sampled_from(LABEL_KINDS + GROUP_KINDS))
    num_classes = 2 if kind == "synergy" else draw(st.integers(2, 8))
    n = draw(st.integers(200, 1500))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    groups = rng.integers(0, 2, n)
    spec = PartitionSection(
        kind=kind, alpha=draw(st.sampled_from([0.1, 0.5, 1.0, 10.0])),
        classes_per_client=draw(st.integers(1, num_classes)), shards_per_client=draw(st.integers(1, 3)),
        min_size=draw(st.integers(1, 10)),
        sizes=draw(st.sampled_from(["equal", "lognormal", "powerlaw", "dirichlet"]))
        if kind in ("iid", "dirichlet") else "equal",
        imbalance=draw(st.sampled_from([1.0, 1.0, 5.0, 50.0])))
    return labels, groups, draw(st.integers(2, 12)), spec, seed


@PROPERTIES
@given(problems())
def test_every_partition_is_disjoint_covers_its_data_and_is_reproducible(problem):
    labels, groups, num_clients, spec, seed = problem
    try:
        parts = partition_labels(labels, num_clients, spec, seed, groups=groups)
    except DataError as exc:  # an impossible request must say what to change
        assert "min_size" in str(exc) or "fewer clients" in str(exc) or "data.num_clients" in str(exc)
        return
    assert len(parts) == num_clients
    union = np.concatenate(parts)
    assert len(union) == len(np.unique(union))  # no example in two clients
    assert all(len(p) >= spec.min_size for p in parts)
    # the long tail keeps, per class in label order, at most n_max * imbalance^(-rank / (C - 1))
    counts, classes = np.bincount(labels), np.unique(labels)
    quota = {c: max(1, int(counts.max() * spec.imbalance ** (-r / (len(classes) - 1))))
             for r, c in enumerate(classes)}
    expected = sum(min(counts[c], quota[c]) for c in classes)
    if spec.kind == "shards":  # equal shards drop a remainder smaller than the number of shards
        assert expected - num_clients * spec.shards_per_client < len(union) <= expected
    elif spec.kind == "pathological":  # every example of each class some client holds is used
        used = np.unique(labels[union])
        assert len(union) == sum(min(counts[c], quota[c]) for c in used)
        assert num_clients < len(classes) or len(used) == len(classes)
    else:
        assert len(union) == expected
    assert np.all(np.bincount(labels[union], minlength=len(counts))[classes] <= [quota[c] for c in classes])
    again = partition_labels(labels, num_clients, spec, seed, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@PROPERTIES
@given(st.integers(0, 1000), st.sampled_from(["lognormal", "powerlaw", "dirichlet"]),
       st.integers(1, 50), st.integers(1, 20), st.integers(0, 2000))
def test_quantity_sizes_sum_to_the_total_and_respect_the_minimum(seed, sizes, clients, min_size, spare):
    spec = PartitionSection(kind="iid", sizes=sizes, min_size=min_size)
    total = clients * min_size + spare
    drawn = quantity_sizes(total, clients, spec, np.random.default_rng(seed))
    assert drawn.sum() == total and drawn.min() >= min_size and len(drawn) == clients


def label_heterogeneity(alpha: float, seed: int) -> float:
    labels = np.repeat(np.arange(10), 300)
    parts = partition_labels(labels, 20, PartitionSection(kind="dirichlet", alpha=alpha, min_size=2), seed)
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    return summarize(counts)["label_tv_distance"]


def test_dirichlet_label_heterogeneity_falls_monotonically_with_alpha():
    alphas = [0.1, 0.3, 1.0, 3.0, 10.0, 1000.0]
    measured = [np.mean([label_heterogeneity(a, s) for s in range(3)]) for a in alphas]
    assert all(a > b for a, b in zip(measured, measured[1:], strict=False)), measured
    assert measured[-1] < 0.1 and measured[0] > 0.6


def test_pathological_clients_hold_exactly_k_classes():
    labels = np.repeat(np.arange(10), 100)
    parts = partition_labels(labels, 10, PartitionSection(kind="pathological", classes_per_client=3), 0)
    assert [len(np.unique(labels[p])) for p in parts] == [3] * 10
    assert len(np.concatenate(parts)) == 1000  # with num_clients >= num_classes every class is used


def test_shards_are_label_sorted_slices():
    labels = np.repeat(np.arange(10), 100)
    parts = partition_labels(labels, 10, PartitionSection(kind="shards", shards_per_client=2), 0)
    assert all(len(p) == 100 and len(np.unique(labels[p])) <= 2 for p in parts)


def test_long_tail_has_the_requested_imbalance():
    labels = np.repeat(np.arange(5), 1000)
    kept = long_tail(labels, 100.0, np.random.default_rng(0))
    counts = np.bincount(labels[kept])
    assert counts[0] == 1000 and counts[-1] == 10
    assert list(counts) == sorted(counts, reverse=True)


def test_heterogeneity_split_puts_the_majority_share_of_group_one_on_the_first_half():
    rng = np.random.default_rng(0)
    labels, groups = rng.integers(0, 2, 20000), rng.integers(0, 2, 20000)
    parts = partition_labels(labels, 4, PartitionSection(kind="heterogeneity"), 0, groups=groups)
    first = np.concatenate(parts[:2])
    share_of_group = [np.isin(np.flatnonzero(groups == g), first).mean() for g in (0, 1)]
    assert share_of_group[1] == pytest.approx(0.92, abs=0.01)
    assert share_of_group[0] == pytest.approx(0.08, abs=0.01)


def test_synergy_split_pairs_group_and_label():
    rng = np.random.default_rng(1)
    labels, groups = rng.integers(0, 2, 20000), rng.integers(0, 2, 20000)
    parts = partition_labels(labels, 2, PartitionSection(kind="synergy", swap_fraction=0.01), 0,
                             groups=groups)
    agree = (groups == labels)
    assert agree[parts[0]].mean() == pytest.approx(0.99, abs=0.005)
    assert agree[parts[1]].mean() == pytest.approx(0.01, abs=0.005)


def test_sensitive_kinds_without_groups_are_an_error():
    with pytest.raises(DataError, match="sensitive attribute"):
        partition_labels(np.zeros(100, np.int64), 2, PartitionSection(kind="synergy"), 0)


def test_self_balancing_gives_a_full_client_no_more_examples():
    """NIID-Bench's rule: once a client holds more than N / n examples it gets none of the later
    classes, so no client ends above N / n plus one class's count; without it they do."""
    labels = np.repeat(np.arange(10), 100)
    sizes = {}
    for balancing in (True, False):
        spec = PartitionSection(kind="dirichlet", alpha=0.1, min_size=5, self_balancing=balancing)
        sizes[balancing] = np.array([[len(p) for p in partition_labels(labels, 10, spec, seed)]
                                     for seed in range(20)])
    assert sizes[True].max() <= 100 + 100
    assert sizes[False].max() > 100 + 100
    assert sizes[True].std() < sizes[False].std()
