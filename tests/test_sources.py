"""Data sources read with Hugging Face `datasets` (hf:, imagefolder:, csv:, parquet:), CIFAR from
its home archive, and the memory-mapped array cache."""

import hashlib
import io
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedsim.config import load_config
from fedsim.data import cifar
from fedsim.data.arraycache import memory_mapped
from fedsim.data.arrays import ArrayDataset
from fedsim.data.federation import build_federation
from fedsim.data.sources import load_source
from fedsim.errors import DataError

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))


def hospital_table(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A hospital's export: numeric and categorical features, a missing value, string labels,
    a sensitive column and the site each row comes from."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"age": rng.integers(20, 70, n).astype(float),
                          "ward": rng.choice(["a", "b", "c"], n), "sex": rng.choice(["f", "m"], n),
                          "site": rng.choice(["s1", "s2", "s3", "s4"], n)})
    frame["outcome"] = np.where(frame["age"] + rng.normal(0, 5, n) > 45, "readmitted", "home")
    frame.loc[3, "age"] = np.nan
    return frame


def table_spec(path, *extra):
    return load_config(None, [f"data.dataset=csv:{path}", "data.hf.label_column=outcome",
                              "data.sensitive=sex", "data.num_clients=4", *extra])


def test_csv_table_is_encoded_with_groups_and_natural_clients(tmp_path):
    frame = hospital_table()
    frame.to_csv(tmp_path / "export.csv", index=False)
    config = table_spec(tmp_path / "export.csv", "data.partition.kind=natural", "data.hf.client_column=site")
    fed = build_federation(config.data, seed=0)
    data = fed.dataset
    assert len(data.y_train) + len(data.y_test) == 599  # the row with a missing value is dropped
    assert data.x_train.shape[1] == 1 + 3 + 2  # age standardized, ward and sex one-hot; site is no feature
    np.testing.assert_allclose(data.x_train[:, 0].mean(), 0.0, atol=1e-5)
    assert data.num_classes == 2 and data.sensitive_groups == ("f", "m")
    kept = frame.dropna().reset_index(drop=True)
    # every natural client holds exactly the training rows of its site (sorted ids: s1 -> 0, ...)
    sites = np.asarray(sorted(kept["site"].unique()))
    train_sites = sites[data.clients_train]
    for client in range(4):
        rows = np.concatenate([fed.train_idx[client], fed.test_idx[client]])
        assert set(train_sites[rows]) == {sites[client]}
        assert len(rows) == int((train_sites == sites[client]).sum())
    # labels follow the sorted label names; groups the sensitive column
    male = data.sensitive_train == 1
    assert abs(male.mean() - (kept["sex"] == "m").mean()) < 0.05


def test_csv_goes_through_every_partition_kind_and_the_tabular_feature_skew(tmp_path):
    hospital_table(800).to_csv(tmp_path / "export.csv", index=False)
    kinds = [("iid",), ("dirichlet",), ("pathological", "data.partition.classes_per_client=1"),
             ("shards",), ("sensitive",), ("heterogeneity",), ("synergy",),
             ("natural", "data.hf.client_column=site"), ("iid", "data.features.kind=shift"),
             ("dirichlet", "data.features.kind=noise")]
    for kind, *extra in kinds:
        config = table_spec(tmp_path / "export.csv", f"data.partition.kind={kind}", *extra)
        fed = build_federation(config.data, seed=1)
        assert fed.num_clients == 4 and min(len(i) for i in fed.train_idx) >= 10, kind
        seen = np.concatenate(fed.train_idx + fed.test_idx)
        assert len(np.unique(seen)) == len(seen), kind  # no example is given to two clients


def test_table_mistakes_name_the_column(tmp_path):
    hospital_table().to_csv(tmp_path / "export.csv", index=False)
    with pytest.raises(DataError, match="no column 'label'.*data.hf.label_column"):
        build_federation(load_config(None, [f"data.dataset=csv:{tmp_path / 'export.csv'}"]).data, 0)
    with pytest.raises(DataError, match="does not exist"):
        build_federation(load_config(None, [f"data.dataset=csv:{tmp_path / 'nope.csv'}"]).data, 0)
    with pytest.raises(DataError, match="2 natural clients, fewer than data.num_clients = 4"):
        frame = hospital_table()
        frame["site"] = np.where(frame["age"] > 40, "x", "y")
        frame.to_csv(tmp_path / "two.csv", index=False)
        build_federation(table_spec(tmp_path / "two.csv", "data.partition.kind=natural",
                                    "data.hf.client_column=site").data, 0)


def grey_images(n: int, seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 3, n)


def image_dataset_dict(writers: int = 5):
    """A DatasetDict like FEMNIST's: grey images, a ClassLabel, a writer id per image."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "writer": datasets.Value("string")})
    splits = {}
    for split, n, seed in (("train", 300, 0), ("test", 60, 1)):
        pixels, labels = grey_images(n, seed)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p) for p in pixels], "label": labels.tolist(),
             "writer": [f"w{i % writers}" for i in range(n)]}, features=features)
    raw = {"train": grey_images(300, 0), "test": grey_images(60, 1)}
    return datasets.DatasetDict(splits), raw


def test_hf_dataset_saved_to_disk_gives_images_and_natural_writers(tmp_path):
    saved, raw = image_dataset_dict()
    saved.save_to_disk(tmp_path / "femnist-like")
    config = load_config(None, [f"data.dataset=hf:{tmp_path / 'femnist-like'}", "data.num_clients=5",
                                "data.partition.kind=natural", "data.hf.client_column=writer"])
    fed = build_federation(config.data, seed=0)
    data = fed.dataset
    assert data.x_train.shape == (300, 1, 8, 8) and data.x_test.shape == (60, 1, 8, 8)
    np.testing.assert_allclose(data.x_train[:, 0], raw["train"][0] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(data.y_test, raw["test"][1])
    assert data.num_classes == 3
    for client in range(5):  # writer wK wrote images K, K+5, K+10, ...
        rows = np.sort(np.concatenate([fed.train_idx[client], fed.test_idx[client]]))
        np.testing.assert_array_equal(rows, np.arange(client, 300, 5))


def test_hf_parquet_folder_goes_through_federated_dataset_and_trains(tmp_path):
    saved, raw = image_dataset_dict()
    folder = tmp_path / "parquet-export"
    folder.mkdir()
    for split, data in saved.items():
        data.to_parquet(folder / f"{split}-00000.parquet")
    config = load_config(None, [f"data.dataset=hf:{folder}", "data.num_clients=4", "model.name=cnn",
                                "experiment.rounds=2", "strategy.clients_per_round=2",
                                "engine.backend=inprocess", f"output.dir={tmp_path / 'runs'}",
                                "data.features.kind=rotation"])
    from fedsim.runner import run_experiment

    summary = run_experiment(config)
    assert summary.rounds["round"].tolist() == [0, 1, 2] and summary.rounds["test_accuracy"].notna().all()
    data = load_source(config.data, 0)
    np.testing.assert_array_equal(data.y_train, raw["train"][1])


def test_image_sources_go_through_every_feature_skew(tmp_path):
    saved, _ = image_dataset_dict()
    saved.save_to_disk(tmp_path / "saved")
    for kind in ("rotation", "noise", "invert", "blur", "mixed", "shift"):
        config = load_config(None, [f"data.dataset=hf:{tmp_path / 'saved'}", "data.num_clients=4",
                                    f"data.features.kind={kind}", "data.features.domains=2"])
        fed = build_federation(config.data, seed=0)
        raw = load_source(config.data, 0).x_train
        for client, changed in ((0, False), (1, True)):  # domain 0 is untouched, domain 1 the strongest
            rows = fed.train_idx[client]
            same = np.allclose(fed.client_data(client).x_train, raw[rows], atol=1e-6)
            assert same != changed, (kind, client)


def test_an_unreachable_hub_dataset_says_what_to_do_offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="Couldn't reach 'nobody/nothing'.*Offline\\? Use a dataset in the "
                                        "Hugging Face cache"):
        load_source(load_config(None, ["data.dataset=hf:nobody/nothing"]).data, 0)


def test_image_folder_with_a_folder_per_class(tmp_path):
    pixels, labels = grey_images(90, 3, size=10)
    names = ["cat", "dog", "owl"]
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        folder = tmp_path / "photos" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / f"{i}.png")
    config = load_config(None, [f"data.dataset=imagefolder:{tmp_path / 'photos'}", "data.num_clients=3",
                                "data.hf.image_size=[6, 5]", "data.test_fraction=0.2"])
    data = build_federation(config.data, seed=0).dataset
    assert data.x_train.shape[1:] == (3, 6, 5) and data.num_classes == 3
    assert len(data.y_train) + len(data.y_test) == 90
    counts = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=3)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=3))


def test_the_readme_table_example_builds_its_federation(tmp_path):
    block = re.search(r"```toml\n(\[data\][^`]*hospital's export.*?)```", README, re.S).group(1)
    (tmp_path / "spec.toml").write_text(block)
    frame = hospital_table(1200).rename(columns={"outcome": "readmitted"})
    frame["site"] = [f"site-{i % 12}" for i in range(len(frame))]
    (tmp_path / "exports").mkdir()
    frame.to_csv(tmp_path / "exports" / "readmissions.csv", index=False)
    fed = build_federation(load_config(tmp_path / "spec.toml").data, seed=0)
    assert fed.num_clients == 12 and fed.dataset.sensitive_groups == ("f", "m")


def test_relative_source_paths_are_relative_to_the_spec(tmp_path):
    hospital_table().to_csv(tmp_path / "export.csv", index=False)
    (tmp_path / "spec.toml").write_text('[data]\ndataset = "csv:export.csv"\n')
    assert load_config(tmp_path / "spec.toml").data.dataset == f"csv:{tmp_path / 'export.csv'}"
    assert load_config(None, ["data.dataset=hf:user/some-hub-name"]).data.dataset == "hf:user/some-hub-name"


def test_memory_mapped_cache_is_built_once_and_shared(tmp_path):
    calls = []

    def build():
        calls.append(1)
        x = np.arange(24, dtype=np.float32).reshape(6, 4)
        return ArrayDataset(x, np.arange(6) % 2, x[:2], np.array([0, 1]), 2)

    first = memory_mapped("demo-key", build)
    second = memory_mapped("demo-key", build)
    assert len(calls) == 1 and isinstance(second.x_train, np.memmap)
    np.testing.assert_array_equal(second.x_train, build().x_train)
    second.x_train[0, 0] = 99.0  # copy-on-write: the file is not changed
    assert memory_mapped("demo-key", build).x_train[0, 0] == 0.0 and first.num_classes == 2


def test_fashion_mnist_is_mapped_by_every_process(data_dir, tmp_path):
    config = load_config(None, ["data.dataset=fashion-mnist"])
    data = load_source(config.data, 0)
    assert isinstance(data.x_train, np.memmap) and data.x_train.shape == (60000, 1, 28, 28)
    # another process finds the decoded arrays and maps the same file instead of decoding again
    code = ("from fedsim.config import load_config; from fedsim.data.sources import load_source; "
            "d = load_source(load_config(None, ['data.dataset=fashion-mnist']).data, 0); "
            "print(d.x_train.filename, float(d.x_train[123].sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == str(data.x_train.filename)
    assert float(out[1]) == pytest.approx(float(data.x_train[123].sum()))
    plain = load_source(load_config(None, ["data.dataset=fashion-mnist", "data.memory_map=false"]).data, 0)
    assert not isinstance(plain.x_train, np.memmap)
    np.testing.assert_array_equal(plain.x_train[::997], data.x_train[::997])


def cifar_archive(path, name: str, per_batch: int = 20) -> dict[str, np.ndarray]:
    """An archive in the real CIFAR python format (pickled dicts of uint8 rows), small."""
    spec = cifar.ARCHIVES[name]
    rng = np.random.default_rng(7)
    arrays: dict[str, list] = {"x_train": [], "y_train": []}
    with tarfile.open(path, "w:gz") as archive:
        for member in (*spec.train_members, spec.test_member):
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, spec.num_classes, per_batch).tolist()
            payload = pickle.dumps({b"data": data, spec.label_key: labels, b"batch_label": b"x"})
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
            key = "train" if member in spec.train_members else "test"
            arrays.setdefault(f"x_{key}", []).append(data)
            arrays.setdefault(f"y_{key}", []).append(labels)
    return {k: np.concatenate(v) for k, v in arrays.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_downloads_from_its_home_verifies_and_resumes(http_server, monkeypatch, name):
    served, base = http_server
    spec = cifar.ARCHIVES[name]
    truth = cifar_archive(served / spec.file, name)
    md5 = hashlib.md5((served / spec.file).read_bytes()).hexdigest()
    monkeypatch.setitem(cifar.ARCHIVES, name, spec.__class__(**{**spec.__dict__, "checksum": f"md5:{md5}"}))
    from fedsim.data.download import cache_dir

    part = cache_dir() / name / (spec.file + ".part")  # an interrupted download is resumed
    part.parent.mkdir(parents=True)
    part.write_bytes((served / spec.file).read_bytes()[:500])
    data = cifar.load(name, None, base_url=base)
    assert data.x_train.shape == (len(spec.train_members) * 20, 3, 32, 32)
    assert data.x_test.shape == (20, 3, 32, 32)
    assert data.num_classes == spec.num_classes
    np.testing.assert_array_equal(data.y_train, truth["y_train"])
    red = truth["x_test"].reshape(-1, 3, 32, 32)[:, 0] / 255.0
    np.testing.assert_allclose(data.x_test[:, 0], (red - spec.mean[0]) / spec.std[0], atol=1e-5)
    # a corrupted archive at the source is refused and not kept
    (cache_dir() / name / spec.file).unlink()
    (served / spec.file).write_bytes(b"not an archive")
    with pytest.raises(DataError, match="does not match its checksum; deleted it"):
        cifar.load(name, None, base_url=base)
    assert not (cache_dir() / name / spec.file).exists()


def test_cifar_with_the_real_checksum_refuses_a_foreign_archive(tmp_path):
    (tmp_path / "cifar10").mkdir()
    cifar_archive(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "cifar10")
    with pytest.raises(DataError, match="does not match its checksum; replace it"):
        cifar.load("cifar10", tmp_path)
