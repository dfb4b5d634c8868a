"""What every merging/pruning chapter shares: edge models from the zoo, the evaluation and
calibration sets, an example input, and the aligned partner of edge model 0.

A chapter's config (``vfnb.resolve(...)``) names the architecture (``model``, ``model_width``,
``norm``), the training recipe (``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``n_train``)
and the data (``dataset``, ``n_test``, ``n_match``); these helpers turn it into tensors and models.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import EXPERIMENTS, Config
from ..data import VisionData, calibration_subset, load_dataset
from ..graph import Permutation, apply_permutation
from ..matching import activation_matching, weight_matching
from ..train import RESNET_LN_CNN, TrainConfig, recipe
from ..zoo import get_or_train, resolve_device

#: Alignment methods by short name (what the configs and tables use).
ALIGNMENTS = ("direct", "wm", "am")
ALIGNMENT_NAMES = {"direct": "direct", "wm": "weight matching", "am": "activation matching"}


def edge_configs(cfg: Config, model: str | None = None, norm: str | None = None,
                 seeds: list[int] | None = None, width: float | None = None) -> list[TrainConfig]:
    """The training configuration of each edge model (one per seed), with the profile's CNN recipe.

    ``model``/``norm``/``seeds``/``width`` override the config's, so one chapter can train e.g. VGG16
    and VGG16-BN from one set of parameters. The recipe is :func:`vfnb.train.recipe` with the
    config's epochs, learning rate, weight decay, batch size, training-set size and width.
    """
    model = model or cfg.model
    norm = norm if norm is not None else cfg.norm
    seeds = list(cfg.seeds if seeds is None else seeds)
    extra: dict[str, Any] = {"width": cfg.model_width if width is None else width}
    if model == "resnet20" or model.startswith("vgg"):
        extra["norm"] = norm
    train_kw = {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
                "n_train": cfg.n_train}
    if model == "resnet20" and norm == "ln":
        # ResNet20-LN has its own batch size and weight decay at the small profiles (train.RESNET_LN_CNN);
        # the chapter's values replace them only where the reader changed them from the profile's defaults
        defaults = EXPERIMENTS[cfg.experiment][cfg.profile]
        for k in RESNET_LN_CNN.get(cfg.profile, {}):
            if k in defaults and train_kw[k] == defaults[k]:
                del train_kw[k]
    return [recipe(model, cfg.profile, dataset=cfg.dataset, seed=s, **train_kw, **extra) for s in seeds]


def edge_models(cfg: Config, model: str | None = None, norm: str | None = None, seeds: list[int] | None = None,
                width: float | None = None, progress: bool = True) -> list[nn.Module]:
    """The trained edge models of :func:`edge_configs`, from the zoo (trained once, then cached)."""
    device = resolve_device(cfg.device)
    return [get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
            for c in edge_configs(cfg, model=model, norm=norm, seeds=seeds, width=width)]


def test_data(cfg: Config) -> VisionData:
    """The evaluation set: the test split, or a fixed stratified subset of ``n_test`` images."""
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    return test if cfg.n_test is None or cfg.n_test >= len(test) else calibration_subset(test, cfg.n_test)


def match_data(cfg: Config) -> VisionData:
    """Training images for activation statistics (matching, REPAIR, RESET): a fixed stratified
    subset of ``n_match`` images, never test images."""
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    return train if cfg.n_match >= len(train) else calibration_subset(train, cfg.n_match, seed=1)


def example_input(data: VisionData, device: torch.device | None = None) -> torch.Tensor:
    """One normalized image of ``data`` as a batch of one (what ``permutation_spec`` traces)."""
    x, _ = next(iter(data.batches(1, augment=False, device=device)))
    return x


def align(model_a: nn.Module, model_b: nn.Module, method: str, data: VisionData,
          layers: int | None = None, seed: int = 0) -> Permutation | None:
    """The permutation that aligns ``model_b`` to ``model_a``: ``"wm"`` weight matching,
    ``"am"`` activation matching on ``data``, ``"direct"`` none (returns ``None``).

    ``layers=l`` permutes only the groups of the first l layers (paper Fig. 4 left).
    """
    if method not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {method!r}; choose one of {', '.join(ALIGNMENTS)}")
    if method == "direct":
        return None
    x = example_input(data, next(model_a.parameters()).device)
    if method == "wm":
        return weight_matching(model_a, model_b, x, seed=seed, layers=layers)
    return activation_matching(model_a, model_b, data, example_input=x, layers=layers)


def aligned(model_b: nn.Module, perm: Permutation | None) -> nn.Module:
    """``model_b`` with ``perm`` applied (unchanged for direct merging)."""
    return model_b if perm is None else apply_permutation(model_b, perm)


#: The edge architectures the book's chapters train: (model, norm). ResNet20 starts from 16
#: channels where VGG starts from 64, so it runs at ``RESNET_WIDTH_FACTOR`` times the VGG width
#: multiplier (``cpu``: VGG ×0.25, ResNet20 ×1.0).
BOOK_ARCHITECTURES: tuple[tuple[str, str], ...] = (("vgg16", "none"), ("vgg16", "bn"), ("vgg16", "ln"),
                                                   ("resnet20", "bn"), ("resnet20", "ln"))
RESNET_WIDTH_FACTOR = 4.0


def width_for(cfg: Config, model: str) -> float:
    """The width multiplier of ``model`` under ``cfg`` (``cfg.model_width`` scaled for ResNet20)."""
    return cfg.model_width * (RESNET_WIDTH_FACTOR if model == "resnet20" else 1.0)
