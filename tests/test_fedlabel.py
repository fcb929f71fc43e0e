"""Clients with few labels (`data.labels`) and the FedLabel add-on."""

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.data.federation import build_federation
from fedsim.errors import ConfigError, DataError


def _federation(*overrides):
    return build_federation(load_config(None, ["data.num_clients=5", *overrides]).data, seed=0)


def test_labels_hide_a_stratified_share_and_keep_every_row():
    full = _federation()
    fed = _federation("data.labels.fraction=0.1")
    y = fed.dataset.y_train
    for k in range(fed.num_clients):
        labelled, hidden = fed.train_idx[k], fed.unlabeled_idx[k]
        assert not np.intersect1d(labelled, hidden).size
        np.testing.assert_array_equal(np.sort(np.concatenate([labelled, hidden])), full.train_idx[k])
        for c in np.unique(y[full.train_idx[k]]):  # every class keeps round(10%), at least one
            total = int((y[full.train_idx[k]] == c).sum())
            kept = int((y[labelled] == c).sum())
            assert kept == max(1, total - min(int(round(0.9 * total)), total - 1))
        np.testing.assert_array_equal(fed.hidden_labels(k), y[hidden])
    assert fed.train_sizes.sum() < 0.2 * full.train_sizes.sum()


def test_unlabelled_inputs_carry_no_labels_to_the_client():
    fed = _federation("data.labels.fraction=0.2")
    data = fed.client_data(0)
    assert len(data.y_train) == len(data.x_train) == len(fed.train_idx[0])
    assert len(data.x_unlabeled) == len(fed.unlabeled_idx[0])
    np.testing.assert_array_equal(data.x_unlabeled, fed.dataset.x_train[fed.unlabeled_idx[0]])
    assert not hasattr(data, "y_unlabeled")


def test_drawn_and_unstratified_shares():
    fed = _federation("data.labels.fraction=0.05", "data.labels.fraction_max=0.5",
                      "data.labels.stratified=false")
    sizes = np.array([len(t) + len(u) for t, u in zip(fed.train_idx, fed.unlabeled_idx)])
    shares = fed.train_sizes / sizes
    assert ((shares >= 0.05 - 1 / sizes) & (shares <= 0.5 + 1 / sizes)).all()
    assert shares.std() > 0.02  # drawn per client, not one share
    assert _federation().unlabeled_idx is None


def test_bad_label_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="fraction_max"):
        load_config(None, ["data.labels.fraction=0.5", "data.labels.fraction_max=0.2"])
    with pytest.raises(ConfigError, match="data.labels.fraction"):
        load_config(None, ["data.labels.fraction=0"])
    spec = load_config(None, ["data.dataset=synthetic", "data.partition.kind=natural",
                              "data.labels.fraction=0.5"])
    with pytest.raises(DataError, match="data.labels"):
        build_federation(spec.data, seed=0)
