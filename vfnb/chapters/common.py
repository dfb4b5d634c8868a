"""What every merging/pruning chapter shares: edge models from the zoo, the evaluation and
calibration sets, the aligned partner of edge model 0, and (§5.1 and §5.2) one
architecture's edge pair merged at α with its vanishing-feature curve.

A chapter's config (:func:`vfnb.config.chapter_config`) names the architecture (``model``,
``model_width``, ``norm``), the training recipe (``epochs``, ``lr``, ``weight_decay``, ``batch_size``,
``n_train``) and the data (``dataset``, ``n_test``, ``n_match``); these helpers turn it into tensors
and models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..activations import example_input
from ..config import EXPERIMENTS, Config
from ..data import VisionData, calibration_subset, load_dataset
from ..diagnose import FeatureBias, LogitStats, VFCurve, feature_bias, logit_stats, vf_curve
from ..evaluate import evaluate
from ..graph import Permutation, apply_permutation
from ..matching import activation_matching, weight_matching
from ..merge import interpolate
from ..train import RESNET_LN_CNN, TrainConfig, recipe
from ..zoo import get_or_train, resolve_device

#: Alignment methods by short name (what the configs and tables use).
ALIGNMENTS = ("direct", "wm", "am")
ALIGNMENT_NAMES = {"direct": "direct", "wm": "weight matching", "am": "activation matching"}


def check_config(cfg: Any, chapter: str) -> None:
    """Raise ``ValueError`` unless ``cfg`` is the :class:`Config` of ``chapter`` (its id in ``EXPERIMENTS``)."""
    if not isinstance(cfg, Config) or cfg.experiment != chapter:
        got = cfg.experiment if isinstance(cfg, Config) else type(cfg).__name__
        raise ValueError(f"expected the config of chapter {chapter!r} (vfnb.resolve({chapter!r}, ...) or "
                         f"vfnb.config.chapter_config({chapter!r}, globals())), got {got!r}")


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


def seed_pairs(seeds: "list[int] | tuple[int, ...]") -> list[tuple[int, int]]:
    """Consecutive seeds form the edge-model pairs: ``[0, 1, 2, 3]`` → ``(0, 1), (2, 3)``."""
    return [(seeds[i], seeds[i + 1]) for i in range(0, len(seeds) - 1, 2)]


def linear_mlp_configs(cfg: Config, residual: bool = False) -> list[TrainConfig]:
    """Linear MLPs (``depth`` × ``width``) with the §4 recipe (paper Table 2), one per seed; ``residual=True``
    adds a residual connection at every layer whose widths agree (a different zoo entry)."""
    extra = {"residual": True} if residual else {}  # the plain networks keep their zoo keys
    return [recipe("mlp", cfg.profile, dataset=cfg.dataset, seed=s, epochs=cfg.epochs, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, n_train=cfg.n_train,
                   depth=cfg.depth, width=cfg.width, activation="none", **extra)
            for s in cfg.seeds]


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
    x = example_input(data, model=model_a)
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


# ---------------------------------------------------------------------------------------------------
# §5.1 and §5.2: one architecture's edge pair, merged at α, through the vanishing-feature lens
#: The architectures of §5.1–5.2: label -> (model, norm). VGG widths come from ``model_width``,
#: ResNet widths from ``resnet_width``.
ARCHS: dict[str, tuple[str, str]] = {
    "VGG16": ("vgg16", "none"),
    "VGG16-BN": ("vgg16", "bn"),
    "VGG16-LN": ("vgg16", "ln"),
    "ResNet20": ("resnet20", "bn"),
    "ResNet20-LN": ("resnet20", "ln"),
}
#: Definition 5.1's "small constant" at this scale: the merged model's output-layer feature is less
#: than half of the edges' (normalized bound ε_L below this).
VF_THRESHOLD = 0.5


def arch_cfg(cfg: Config, model: str) -> Config:
    """``cfg`` with the width of ``model``'s family as ``model_width`` (what :func:`edge_configs` reads):
    ``resnet_width`` for ResNet20, else ``model_width``."""
    return cfg.replace(model_width=float(cfg.resnet_width if model == "resnet20" else cfg.model_width))


@dataclass
class Merged:
    """One architecture's two edge models and their merged model at ``alpha`` (edge 1 aligned)."""

    label: str
    alignment: str
    alpha: float
    edges: list[nn.Module]
    partner: nn.Module
    merged: nn.Module
    edge_accuracy: list[float]
    accuracy: float
    edge_fb: list[FeatureBias]
    curve: VFCurve
    logits: dict[str, LogitStats] = field(default_factory=dict)

    @property
    def eps_last(self) -> float:
        """ε_L, the normalized bound at the output layer."""
        return float(self.curve.bound[-1])

    def summary(self) -> dict[str, Any]:
        c = self.curve
        return {"model": self.label, "alignment": ALIGNMENT_NAMES[self.alignment],
                "edge accuracy": float(np.mean(self.edge_accuracy)),
                f"merged accuracy (α={self.alpha:g})": self.accuracy,
                "E_l first layer": float(c.ratio[0]), "ε_L = E_L": self.eps_last,
                f"VF (ε_L < {VF_THRESHOLD})": "yes" if c.vanishes(VF_THRESHOLD) else "no"}


@dataclass
class Edges:
    """Two trained edge models of one architecture with their test accuracy and feature–bias statistics."""

    label: str
    models: list[nn.Module]
    accuracy: list[float]
    fb: list[FeatureBias]


def load_edges(cfg: Config, label: str, test: VisionData, progress: bool = True) -> Edges:
    """The edge models (seeds ``cfg.seeds``) of ``label`` (one of :data:`ARCHS`) from the zoo, measured on ``test``."""
    if label not in ARCHS:
        raise ValueError(f"unknown architecture {label!r}; choose one of {', '.join(ARCHS)}")
    model, norm = ARCHS[label]
    models = edge_models(arch_cfg(cfg, model), model=model, norm=norm, seeds=list(cfg.seeds[:2]), progress=progress)
    for m in models:
        m.eval()
    return Edges(label, models, [evaluate(m, test)["accuracy"] for m in models],
                 [feature_bias(m, test) for m in models])


def merge_pair(cfg: Config, edges: Edges, test: VisionData, mdata: VisionData, alignment: str | None = None,
               with_logits: bool = False) -> Merged:
    """Align edge model 1 to edge model 0 (``alignment``, default ``cfg.alignment``), merge at ``cfg.alpha``
    without normalization, and measure accuracy and the vanishing-feature curve on ``test``."""
    alignment = alignment or cfg.alignment
    e0, e1 = edges.models
    partner = aligned(e1, align(e0, e1, alignment, mdata))
    merged = interpolate(e0, partner, cfg.alpha)
    res = Merged(label=edges.label, alignment=alignment, alpha=cfg.alpha, edges=edges.models, partner=partner,
                 merged=merged, edge_accuracy=edges.accuracy, accuracy=evaluate(merged, test)["accuracy"],
                 edge_fb=edges.fb, curve=vf_curve(merged, edges.fb, test))
    if with_logits:
        res.logits = {"edge 0": logit_stats(e0, test), "edge 1": logit_stats(e1, test),
                      f"merged α={cfg.alpha:g}": logit_stats(merged, test)}
    return res
