import gzip
import hashlib

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.data import download as dl
from fedsim.data import tabular
from fedsim.data.federation import build_federation
from fedsim.data.partition import partition_labels
from fedsim.data.sources import check_sensitive
from fedsim.data.synthetic import SyntheticClients
from fedsim.errors import ConfigError, DataError


def test_digits_federation_is_a_disjoint_cover_of_the_training_set():
    config = load_config(None, ["data.num_clients=20"])
    fed = build_federation(config.data, seed=0)
    all_idx = np.concatenate(fed.train_idx + fed.test_idx)
    assert len(all_idx) == len(np.unique(all_idx)) == len(fed.dataset.y_train)
    assert fed.num_clients == 20 and fed.input_shape == (1, 8, 8)
    assert (fed.train_sizes >= 1).all()
    x, y = fed.test_set()
    assert len(y) == round(0.2 * 1797) and x.shape[1:] == (1, 8, 8)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 200)
    spec = load_config(None).data.partition

    def mean_max_share(alpha: float) -> float:
        parts = partition_labels(labels, 10, spec.model_copy(update={"alpha": alpha}), seed=1)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert mean_max_share(0.1) > mean_max_share(1.0) > mean_max_share(100.0)
    assert mean_max_share(100.0) < 0.2


def test_iid_partition_is_shuffled_and_even():
    labels = np.repeat(np.arange(10), 100)
    spec = load_config(None, ["data.partition.kind=iid"]).data.partition
    parts = partition_labels(labels, 10, spec, seed=0)
    assert [len(p) for p in parts] == [100] * 10
    assert all(len(np.unique(labels[p])) > 5 for p in parts)


def test_impossible_minimum_size_is_an_error_not_a_loop():
    spec = load_config(None, ["data.partition.min_size=50"]).data.partition
    with pytest.raises(DataError, match="cannot give 30 clients at least 50 examples"):
        partition_labels(np.zeros(1000, dtype=np.int64), 30, spec, seed=0)


def test_synthetic_clients_are_pure_functions_of_seed_and_id():
    spec = load_config(None).data.synthetic
    a, b = SyntheticClients(spec, 100, seed=3), SyntheticClients(spec, 100_000, seed=3)
    xa, ya = a.generate(7)
    xb, yb = b.generate(7)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert xa.shape == (a.sizes[7], 60) and a.sizes.min() >= 50
    other, _ = SyntheticClients(spec, 100, seed=4).generate(7)
    assert not np.allclose(xa[:5], other[:5])


def test_synthetic_alpha_beta_control_heterogeneity():
    """Larger beta spreads client feature means apart; the IID variant shares one model."""
    def spread(**kw) -> float:
        spec = load_config(None).data.synthetic.model_copy(update=kw)
        clients = SyntheticClients(spec, 30, seed=0)
        return float(np.std([clients.generate(k)[0].mean() for k in range(30)]))

    assert spread(beta=0.0, alpha=0.0) < spread(beta=1.0, alpha=1.0)
    assert spread(iid=True) < 0.1


def test_fashion_mnist_loads_from_data_dir_and_verifies(data_dir):
    config = load_config(None, ["data.dataset=fashion-mnist", "data.num_clients=10"])
    fed = build_federation(config.data, seed=0)
    assert fed.dataset.x_train.shape == (60000, 1, 28, 28)
    assert fed.dataset.x_test.shape == (10000, 1, 28, 28)
    assert 0.0 <= fed.dataset.x_train.min() and fed.dataset.x_train.max() <= 1.0


def test_download_verify_and_resume(http_server, tmp_path):
    served, base = http_server
    payload = np.arange(50_000, dtype=np.uint8).tobytes()
    with gzip.open(served / "blob.gz", "wb") as handle:
        handle.write(payload)
    sha = hashlib.sha256(payload).hexdigest()
    # an interrupted earlier download leaves a partial file: the fetch resumes it
    cache = dl.cache_dir() / "demo"
    cache.mkdir(parents=True)
    full = (served / "blob.gz").read_bytes()
    (cache / "blob.gz.part").write_bytes(full[:1000])
    path = dl.verified_file("demo", "blob.gz", sha, [tmp_path / "empty"], base + "blob.gz",
                            decompressed=True)
    assert path.read_bytes() == full
    # a corrupted download is rejected and removed
    with pytest.raises(DataError, match="does not match its checksum"):
        dl.verified_file("demo2", "blob.gz", "0" * 64, [], base + "blob.gz", decompressed=True)
    assert not (dl.cache_dir() / "demo2" / "blob.gz").exists()


def test_offline_without_files_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match="Put 'x.gz' into one of: .*nowhere"):
        dl.verified_file("demo", "x.gz", "0" * 64, [tmp_path / "nowhere"],
                         "http://127.0.0.1:9/x.gz")


def test_adult_and_german_have_the_known_rows_and_sensitive_groups(data_dir):
    adult = tabular.load_adult(data_dir)
    assert len(adult.y_train) == 30162 and len(adult.y_test) == 15060  # 45,222 complete rows
    assert adult.x_train.shape[1] == adult.x_test.shape[1] and adult.x_train.dtype == np.float32
    assert adult.sensitive_groups == ("female", "male")
    assert adult.sensitive_train.mean() == pytest.approx(0.676, abs=0.001)  # share of men
    assert adult.y_train.mean() == pytest.approx(0.249, abs=0.001)  # income >50K
    numeric = adult.x_train[:, :len(tabular.ADULT_NUMERIC)].astype(np.float64)
    np.testing.assert_allclose(numeric.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(numeric.std(axis=0), 1.0, atol=1e-4)
    german = tabular.load_german(data_dir, test_fraction=0.2, seed=0, attribute="age")
    assert len(german.y_train) + len(german.y_test) == 1000 and german.y_train.mean() == 0.7
    assert german.sensitive_groups == ("<=25", ">25")
    female = tabular.load_german(data_dir, 0.2, 0).sensitive_train == 0
    assert 0.30 < female.mean() < 0.33  # 310 of the 1,000 applicants are women


def test_adult_downloads_from_its_home_and_verifies(http_server, data_dir):
    served, base = http_server
    for name in tabular.ADULT_FILES:
        (served / name).write_bytes((data_dir / "adult" / name).read_bytes())
    adult = tabular.load_adult(root=None, base_url=base)
    assert len(adult.y_train) + len(adult.y_test) == 45222
    assert (dl.cache_dir() / "adult" / "adult.data").is_file()


def test_unknown_sensitive_attribute_is_a_config_error():
    with pytest.raises(ConfigError, match="choose one of: sex, race"):
        check_sensitive(load_config(None, ["data.dataset=adult", "data.sensitive=age"]).data)
    with pytest.raises(ConfigError, match="digits has no sensitive attribute"):
        check_sensitive(load_config(None, ["data.sensitive=sex"]).data)
    with pytest.raises(ConfigError, match="needs a dataset with a sensitive attribute"):
        check_sensitive(load_config(None, ["data.partition.kind=synergy"]).data)


def test_feature_skew_transforms_each_domain_deterministically():
    spec = ["data.features.kind=rotation", "data.features.domains=3", "data.num_clients=6"]
    fed = build_federation(load_config(None, spec).data, seed=0)
    plain = build_federation(load_config(None, spec[2:]).data, seed=0)
    assert np.array_equal(fed.train_idx[0], plain.train_idx[0])  # the split does not change
    x, x0 = fed.dataset.x_train, plain.dataset.x_train
    for client in range(6):
        idx = fed.train_idx[client]
        changed = not np.allclose(x[idx], x0[idx])
        assert changed == (client % 3 != 0)  # domain 0 is the original data
    last = fed.train_idx[2][0]  # domain 2: the full 90 degrees
    np.testing.assert_allclose(x[last, 0], np.rot90(x0[last, 0]), atol=1e-5)
    assert set(np.unique(fed.test_domain)) == {0, 1, 2}
