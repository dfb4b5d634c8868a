"""Profiles and validated chapter parameters.

A *profile* (``smoke``, ``cpu``, ``paper``) fixes the sizes of every experiment, so that
notebooks never hard-code them. ``EXPERIMENTS[<chapter id>]`` is the one declaration of a
chapter's parameters: the chapter id is its notebook's stem without the number prefix
(``05_4_preserve_first_merging`` → ``preserve_first_merging``), which is also the name of its
module in :mod:`vfnb.chapters`. The chapter's ``parameters`` cell sets ``profile`` and leaves
every declared name at ``None``; :func:`chapter_config` reads those names from the notebook and
:func:`resolve` fills the ``None`` values from the profile and checks every value, so that a typo
or an out-of-range value stops the run at once with a message that names the parameter and what
is allowed.
"""
from __future__ import annotations

import ast
import functools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

PROFILES = ("smoke", "cpu", "paper")
DATASET_NAMES = ("mnist5k", "mnist", "cifar10", "cifar100")
#: (training, test) images of each dataset's splits (``vfnb.data``), for the size checks of :func:`resolve`.
SPLIT_SIZES: dict[str, tuple[int, int]] = {"mnist5k": (4000, 1000), "mnist": (60000, 10000),
                                           "cifar10": (50000, 10000), "cifar100": (50000, 10000)}


@dataclass(frozen=True)
class Param:
    """One parameter: how to check it, and what the check allows (for messages).

    ``is_list``: the value is a list, so a string (papermill's ``-p`` passes text) is parsed first.
    """

    check: Callable[[Any], bool]
    allowed: str
    doc: str = ""
    is_list: bool = False


def _int(lo: int, hi: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _float(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo < v if lo_open else lo <= v) and v <= hi
    return ok


def _choice(*options: Any) -> Callable[[Any], bool]:
    return lambda v: v in options


def _seeds(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) >= 2 and len(set(v)) == len(v)
            and all(_int(0)(s) for s in v))


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


#: Every parameter any chapter may take, with its check.
PARAMS: dict[str, Param] = {
    "profile": Param(_choice(*PROFILES), f"one of {', '.join(PROFILES)}", "size profile"),
    "dataset": Param(_choice(*DATASET_NAMES), f"one of {', '.join(DATASET_NAMES)}", "dataset name"),
    "data_root": Param(_optional(lambda v: isinstance(v, (str, os.PathLike))), "a directory path or None",
                       "where torchvision datasets live"),
    "n_train": Param(_optional(_int(1)), "an integer >= 1, or None for the whole training split",
                     "training images used"),
    "n_test": Param(_optional(_int(1)), "an integer >= 1, or None for the whole test split",
                    "test images used for every evaluation"),
    "seeds": Param(_seeds, "a list of >= 2 distinct integers >= 0", "seeds of the edge models", is_list=True),
    "depth": Param(_int(2, 64), "an integer in [2, 64]", "number of linear layers"),
    "width": Param(_int(1, 4096), "an integer in [1, 4096]", "hidden width"),
    "epochs": Param(_int(1, 1000), "an integer in [1, 1000]", "training epochs"),
    "lr": Param(_float(0.0, 10.0, lo_open=True), "a float in (0, 10]", "peak learning rate"),
    "weight_decay": Param(_float(0.0, 1.0), "a float in [0, 1]", "weight decay"),
    "batch_size": Param(_int(1, 65536), "an integer in [1, 65536]", "training batch size"),
    "alpha": Param(_float(0.0, 1.0), "a float in [0, 1]", "merging coefficient shown first"),
    "n_alphas": Param(_int(2, 201), "an integer in [2, 201]", "points on the α grid (both ends included)"),
    "model": Param(_choice("vgg11", "vgg13", "vgg16", "vgg19", "resnet20"),
                   "one of vgg11, vgg13, vgg16, vgg19, resnet20", "edge-model architecture"),
    "model_width": Param(_float(0.0, 8.0, lo_open=True), "a float in (0, 8]", "channel-width multiplier"),
    "norm": Param(_choice("none", "bn", "ln"), "one of none, bn, ln", "normalization layers"),
    "n_match": Param(_int(1), "an integer >= 1", "training images used for activation matching"),
    "device": Param(_choice("auto", "cpu", "cuda"), "one of auto, cpu, cuda", "where to compute"),
    "cache_dir": Param(_optional(lambda v: isinstance(v, (str, os.PathLike))), "a directory path or None",
                       "trained-model cache (default: $VFNB_CACHE or ~/.cache/vfnb/zoo)"),
}

# --- §5.5 pruning (vfnb.chapters.pruning) ---------------------------------------------------------------
#: Pruners of the pruning chapter: global / layerwise magnitude, Wanda (per output row), diagonal Fisher.
PRUNER_NAMES = ("magnitude", "magnitude-layerwise", "wanda", "fisher")


def _sparsity_grid(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) >= 1 and all(_float(0.0, 1.0)(s) and s < 1 for s in v)
            and list(v) == sorted(set(v)))


def _distinct(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (list, tuple)) and len(v) >= 1 and len(set(v)) == len(v)
                      and all(check(x) for x in v))


PARAMS.update({
    "seed": Param(_int(0), "an integer >= 0", "seed of the (single) trained model"),
    "sparsity": Param(lambda v: _float(0.0, 1.0)(v) and v < 1, "a float in [0, 1)",
                      "sparsity of the figures that show one pruned model (Fig. 5A/B)"),
    "sparsities": Param(_sparsity_grid, "an increasing list of distinct floats in [0, 1)",
                        "sparsity grid of the accuracy curves and the explorer", is_list=True),
    "pruners": Param(_distinct(_choice(*PRUNER_NAMES)), f"a list of distinct names from {', '.join(PRUNER_NAMES)}",
                     "one-shot pruners compared", is_list=True),
    "n_calib": Param(_int(2), "an integer >= 2", "calibration images (training set) for Wanda/Fisher and REPAIR/RESET"),
    "calib_sizes": Param(_distinct(_int(2)), "a list of distinct integers >= 2",
                         "calibration sizes of appendix A.7 (the whole n_match pool is added)", is_list=True),
    "n_diag": Param(_int(2), "an integer >= 2", "test images for the logit and vanishing-feature diagnostics"),
    "convnext_width": Param(_float(0.0, 8.0, lo_open=True), "a float in (0, 8]",
                            "width multiplier of the ConvNeXt of appendix A.7 (Wanda on its linear layers)"),
    "convnext_epochs": Param(_int(1, 1000), "an integer in [1, 1000]", "training epochs of the ConvNeXt of appendix A.7"),
})

# --- §5.1 / §5.2 vanishing feature (vfnb.chapters.vanishing_feature, vfnb.chapters.merging_through_vf) -----
PARAMS.update({
    "alignment": Param(_choice("direct", "wm", "am"), "one of direct, wm, am",
                       "how edge model 1 is aligned before merging (weight / activation matching)"),
    "resnet_width": Param(_float(0.0, 8.0, lo_open=True), "a float in (0, 8]", "ResNet20 width multiplier"),
    "mlp_depth": Param(_int(2, 64), "an integer in [2, 64]", "layers of the linear MLPs of Fig. 3D"),
    "mlp_width": Param(_int(1, 4096), "an integer in [1, 4096]", "width of the linear MLPs of Fig. 3D"),
    "mlp_epochs": Param(_int(1, 1000), "an integer in [1, 1000]", "training epochs of the linear MLPs of Fig. 3D"),
    "mlp_dataset": Param(_choice(*DATASET_NAMES), f"one of {', '.join(DATASET_NAMES)}",
                         "dataset of the linear MLPs of Fig. 3D (Table 2: MNIST)"),
})

# --- §5.3 enhanced normalization, ZipIt! (vfnb.chapters.enhanced_normalization) --------------------------
PARAMS.update({
    "n_val": Param(_int(1), "an integer >= 1",
                   "training images held out from calibration to choose k for bias removal (never test images)"),
    "zip_alpha": Param(_float(0.0, 1.0), "a float in [0, 1]", "ZipIt!'s α: similarity decay of a merged feature"),
    "zip_beta": Param(_float(0.0, 1.0), "a float in [0, 1]", "ZipIt!'s β: same-model merge budget"),
    "compare_weight_decay": Param(lambda v: isinstance(v, (list, tuple)) and all(_float(0.0, 1.0)(w) for w in v),
                                  "a list of floats in [0, 1] (may be empty)",
                                  "weight decays of extra edge-model pairs for the recipe comparison (A.4)",
                                  is_list=True),
})

# --- §5.4 Preserve-First Merging (vfnb.chapters.preserve_first_merging) ----------------------------------
PARAMS.update({
    "pfm_layers": Param(_distinct(_int(0)), "a list of distinct integers >= 0 (at most L of the model)",
                        "numbers l of preserved layers in the PFM tables (Table 1 uses 0, 3, 6, 8, 12 of 14)",
                        is_list=True),
    "resnet_layers": Param(_distinct(_int(0)), "a list of distinct integers >= 0 (at most 20)",
                           "numbers l of preserved layers in the ResNet20 PFM table (appendix Table 7)", is_list=True),
    "zip_layers": Param(_distinct(_int(0)), "a list of distinct integers >= 0 (at most L of the model)",
                        "numbers of unmerged layers compared for PFM and partial zipping (appendix A.8.2)",
                        is_list=True),
    "sweep_layers": Param(_optional(_distinct(_int(0))), "a list of distinct integers >= 0, or None for every l",
                          "the l grid of Fig. 4 left and of the preserved-layers explorer (None: 0, 1, ..., L)",
                          is_list=True),
})

# --- appendix A.8.4 vision transformers (vfnb.chapters.vision_transformers) ------------------------------
PARAMS.update({
    "vit_depth": Param(_int(1, 64), "an integer in [1, 64]", "encoder blocks of the ViTs (Table 5's L is this + 1)"),
    "num_heads": Param(_int(1, 64), "an integer in [1, 64]", "attention heads of the ViTs"),
    "patch_size": Param(_int(1, 64), "an integer in [1, 64]", "side of the ViTs' square patches, in pixels"),
    "ot_reg": Param(_float(0.0, 10.0), "a float in [0, 10] (0: exact earth mover's plan)",
                    "entropic regularization of OT fusion, relative to the largest cost"),
    "ot_regs": Param(_distinct(_float(0.0, 10.0)), "a list of distinct floats in [0, 10]",
                     "OT regularizations compared on training images (ot_reg is added)", is_list=True),
})

# --- appendix A.1 closed forms (vfnb.chapters.closed_forms) ---------------------------------------------------
PARAMS.update({
    "n_inputs": Param(_int(2, 100000), "an integer in [2, 100000]",
                      "random inputs (and test images) on which the closed forms are checked"),
})

# --- appendix A.4 training recipe (vfnb.chapters.training_recipe) ---------------------------------------------
_LR_ARCHS = ("VGG", "VGG-LN", "ResNet20-LN")
PARAMS.update({
    "lrs": Param(_distinct(_float(0.0, 10.0, lo_open=True)), "a list of >= 2 distinct floats in (0, 10]",
                 "learning rates of Fig. 6A (the smallest and largest also serve Fig. 9)", is_list=True),
    "weight_decays": Param(_distinct(_float(0.0, 1.0)), "a list of >= 2 distinct floats in [0, 1]",
                           "weight decays of Fig. 6C (the smallest and largest also compare REPAIR and RESCALE)",
                           is_list=True),
    "lr_archs": Param(_distinct(_choice(*_LR_ARCHS)), f"a list of distinct names from {', '.join(_LR_ARCHS)}",
                      "architectures of the learning-rate sweep", is_list=True),
    "rebasin_lrs": Param(_distinct(_float(0.0, 10.0, lo_open=True)), "a list of >= 2 distinct floats in (0, 10]",
                         "peak learning rates of VGG16-LN on MNIST with Git Re-Basin's recipe", is_list=True),
    "rebasin_epochs": Param(_int(1, 1000), "an integer in [1, 1000]", "epochs of the VGG16-LN MNIST models (Git Re-Basin: 25)"),
    "rebasin_width": Param(_float(0.0, 8.0, lo_open=True), "a float in (0, 8]", "width multiplier of the VGG16-LN MNIST models"),
    "rebasin_dataset": Param(_choice(*DATASET_NAMES), f"one of {', '.join(DATASET_NAMES)}",
                             "dataset of the VGG16-LN models (Git Re-Basin: MNIST)"),
})

# --- beyond the paper: multi-task merging, TACT (vfnb.chapters.multitask_merging) ------------------------------
TASK_NAMES = ("mnist5k-0to4", "mnist5k-5to9", "mnist5k-inverted", "mnist5k-rot90", "digits")  # = vfnb.data.TASKS
PARAMS.update({
    "tasks": Param(lambda v: _distinct(_choice(*TASK_NAMES))(v) and len(v) >= 2,
                   f"a list of >= 2 distinct names from {', '.join(TASK_NAMES)}",
                   "the tasks, in merging order (the first two span the landscapes of Figs. 1-2)", is_list=True),
    "finetune_epochs": Param(_int(1, 1000), "an integer in [1, 1000]", "epochs of fine-tuning each expert"),
    "finetune_lr": Param(_float(0.0, 10.0, lo_open=True), "a float in (0, 10]",
                         "learning rate of fine-tuning (SGD, constant, weight decay 5e-4)"),
    "task_calib": Param(_int(2), "an integer >= 2",
                        "training images per task for TACT, REPAIR, the linear probes and the choice of λ"),
    "scales": Param(lambda v: _distinct(_float(0.0, 4.0, lo_open=True))(v), "a list of distinct floats in (0, 4]",
                    "task-vector scales λ among which each merge picks its best on training images", is_list=True),
    "ties_density": Param(_float(0.0, 1.0, lo_open=True), "a float in (0, 1]",
                          "fraction of each task vector TIES keeps (its trim step)"),
    "n_grid": Param(_int(2, 41), "an integer in [2, 41]", "points per axis of the task-vector landscapes (Figs. 1-2)"),
    "grid_max": Param(_float(0.0, 4.0, lo_open=True), "a float in (0, 4]",
                      "largest task-vector scale on the landscapes' axes (they start at 0)"),
    "n_tsne": Param(_int(10, 10000), "an integer in [10, 10000]", "test images embedded by t-SNE (Fig. 4)"),
})

# --- §6 conclusion (vfnb.chapters.conclusion) ------------------------------------------------------------------
PARAMS.update({
    "results_dir": Param(_optional(lambda v: isinstance(v, (str, os.PathLike))), "a directory path or None",
                         "where chapters record their results (default: $VFNB_RESULTS or ~/.cache/vfnb/results)"),
    # --- reproduction page (vfnb.chapters.reproduction)
    "sweeps_dir": Param(_optional(lambda v: isinstance(v, (str, os.PathLike))), "a directory path or None",
                        "folder of committed sweep results (default: results/ in the source checkout)"),
})

# ------------------------------------------------------------------------------------------------------------
# Profile defaults, per chapter id. Every key is a parameter of that chapter; device and cache_dir come last.
_DATA = {"dataset": "mnist5k", "data_root": None}
_RUNTIME = {"device": "auto", "cache_dir": None}

#: Profile defaults, per chapter id (= notebook stem without the number = module of vfnb.chapters).
EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {}

# Paper §4: 8-layer linear MLPs of width 32 on MNIST, Adam 0.01 constant, batch 128, weight decay 1e-4,
# 20 epochs: the "Linear Network" row of the paper's Table 2 (appendix A.3). The appendix text says the
# §4.2 networks train for 5 epochs; the `paper` profile follows the table (tests/test_config.py checks it).
EXPERIMENTS["linear_networks"] = {
    "smoke": {**_DATA, "n_train": 512, "n_test": 256, "seeds": [0, 1], "depth": 8, "width": 32,
              "epochs": 1, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5, "n_alphas": 5},
    # 4,000 images give 32 steps an epoch: 20 epochs, Table 2's MNIST budget.
    "cpu": {**_DATA, "n_train": None, "n_test": None, "seeds": [0, 1], "depth": 8, "width": 32,
            "epochs": 20, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5, "n_alphas": 11},
    "paper": {**_DATA, "dataset": "mnist", "n_train": None, "n_test": None, "seeds": [0, 1],
              "depth": 8, "width": 32, "epochs": 20, "lr": 0.01, "weight_decay": 1e-4,
              "batch_size": 128, "alpha": 0.5, "n_alphas": 21},
}
# Appendix A.1: the §4 networks (shared with that chapter through the zoo), their residual twins trained with the
# same recipe, and two untrained square residual networks; n_inputs Gaussian inputs check every layer.
EXPERIMENTS["closed_forms"] = {
    p: {**{k: v for k, v in d.items() if k != "n_alphas"}, "n_inputs": {"smoke": 64, "cpu": 512, "paper": 1000}[p]}
    for p, d in EXPERIMENTS["linear_networks"].items()}
# Appendix A.4: VGG11 at 1/8 width at cpu (the whole chapter trains ~36 small models), the paper's grids at paper.
# Consecutive seeds form the pairs; the first pair serves every sweep, all pairs the REPAIR/RESCALE comparison.
EXPERIMENTS["training_recipe"] = {
    "smoke": {**_DATA, "n_train": 512, "n_test": 256, "seeds": [0, 1, 2, 3], "model": "vgg11", "model_width": 0.0625,
              "epochs": 1, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128, "lrs": [0.01, 0.1],
              "weight_decays": [1e-4, 1e-2], "lr_archs": ["VGG"], "n_alphas": 3, "n_match": 128,
              "rebasin_lrs": [0.001, 0.1], "rebasin_epochs": 1, "rebasin_width": 0.0625, "rebasin_dataset": "mnist5k"},
    "cpu": {**_DATA, "n_train": None, "n_test": None, "seeds": [0, 1, 2, 3, 4, 5], "model": "vgg11",
            "model_width": 0.125, "epochs": 8, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128,
            "lrs": [0.01, 0.05, 0.1], "weight_decays": [1e-4, 5e-4, 5e-3, 1e-2], "lr_archs": ["VGG", "VGG-LN"],
            "n_alphas": 11, "n_match": 1000, "rebasin_lrs": [0.001, 0.01, 0.1], "rebasin_epochs": 4,
            "rebasin_width": 0.125, "rebasin_dataset": "mnist5k"},
    "paper": {**_DATA, "dataset": "cifar10", "n_train": None, "n_test": None, "seeds": [0, 1, 2, 3, 4, 5],
              "model": "vgg16", "model_width": 1.0, "epochs": 160, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 128,
              "lrs": [0.01, 0.03, 0.05, 0.07, 0.1], "weight_decays": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4],
              "lr_archs": ["VGG", "VGG-LN", "ResNet20-LN"], "n_alphas": 21, "n_match": 5000,
              "rebasin_lrs": [0.001, 0.01, 0.1], "rebasin_epochs": 25, "rebasin_width": 1.0, "rebasin_dataset": "mnist"},
}
# Paper §6: the claims every chapter recorded at this profile, gathered (vfnb.results).
EXPERIMENTS["conclusion"] = {p: {"results_dir": None} for p in PROFILES}
# The reproduction page reads the sweeps committed under results/ (vfnb.chapters.reproduction.RESULTS by default).
EXPERIMENTS["reproduction"] = {p: {"sweeps_dir": None} for p in PROFILES}
# Paper §1: the linear networks of §4 in one figure; only where things live can be chosen.
EXPERIMENTS["introduction"] = {p: {"data_root": None} for p in PROFILES}
# Paper §2: direct, weight-matching and activation-matching merging of two VGG16 edge models.
# The cpu sizes follow vfnb.train.PROFILE_CNN (width 0.25, 15 epochs, lr 0.1, weight decay 1e-2, clip 1).
EXPERIMENTS["preliminaries"] = {
    "smoke": {**_DATA, "n_train": 512, "n_test": 256, "seeds": [0, 1], "model": "vgg16", "model_width": 0.0625,
              "norm": "none", "epochs": 1, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128,
              "alpha": 0.5, "n_alphas": 5, "n_match": 256},
    "cpu": {**_DATA, "n_train": None, "n_test": None, "seeds": [0, 1], "model": "vgg16", "model_width": 0.25,
            "norm": "none", "epochs": 15, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128,
            "alpha": 0.5, "n_alphas": 11, "n_match": 1000},
    "paper": {**_DATA, "dataset": "cifar10", "n_train": None, "n_test": None, "seeds": [0, 1],
              "model": "vgg16", "model_width": 1.0, "norm": "none", "epochs": 160, "lr": 0.1,
              "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5, "n_alphas": 21, "n_match": 5000},
}
# Paper §3: tables generated from this module and vfnb.train; the edge models are those of every chapter.
EXPERIMENTS["experimental_setup"] = {p: {"data_root": None} for p in PROFILES}

# Paper §5.5 and appendix A.7: one-shot pruning of VGG16-LN (then REPAIR) and VGG16-BN (then RESET),
# one trained model each (seed 0; the cpu recipe of "preliminaries", so the zoo's edge models are reused).
_PRUNE_SIZES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
EXPERIMENTS["pruning"] = {
    "smoke": {**_DATA, "n_train": 512, "n_test": 256, "seed": 0, "model": "vgg16", "model_width": 0.0625,
              "epochs": 1, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128, "n_match": 256, "n_calib": 64,
              "calib_sizes": [32], "sparsity": 0.9, "sparsities": [0.5, 0.9], "pruners": list(PRUNER_NAMES),
              "n_diag": 32, "convnext_width": 0.25, "convnext_epochs": 1},
    # n_match 4000 = the whole mnist5k training split: appendix A.7's "full" calibration set. Every one of
    # the 2 × 4 × 11 pruned models is evaluated twice (before/after the fix), so a stratified half of the
    # test split (500 images) keeps the run to a few minutes on 2 cores.
    "cpu": {**_DATA, "n_train": None, "n_test": 500, "seed": 0, "model": "vgg16", "model_width": 0.25,
            "epochs": 15, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128, "n_match": 4000, "n_calib": 256,
            "calib_sizes": [64, 128, 256], "sparsity": 0.9, "sparsities": _PRUNE_SIZES,
            "pruners": list(PRUNER_NAMES), "n_diag": 128, "convnext_width": 0.5, "convnext_epochs": 6},
    "paper": {**_DATA, "dataset": "cifar10", "n_train": None, "n_test": None, "seed": 0, "model": "vgg16",
              "model_width": 1.0, "epochs": 160, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 128,
              "n_match": 50000, "n_calib": 256, "calib_sizes": [64, 128, 256], "sparsity": 0.8,
              "sparsities": _PRUNE_SIZES, "pruners": list(PRUNER_NAMES), "n_diag": 1000, "convnext_width": 1.0,
              "convnext_epochs": 160},
}

# VGG16 none/bn/ln at model_width and ResNet20 bn/ln at resnet_width, with the "preliminaries" CNN recipe, so
# the cpu profile reuses the zoo's edge models. Fig. 3D: linear MLPs on MNIST (Table 2: Adam 0.01, 20 epochs).
_VF_CNN = {
    # smoke: the shared smoke edge models; 128 test / calibration images keep the ten models' diagnostics fast
    "smoke": {**_DATA, "n_train": 512, "n_test": 128, "seeds": [0, 1], "model_width": 0.0625, "resnet_width": 0.25,
              "epochs": 1, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128, "alpha": 0.5, "n_match": 128,
              "alignment": "wm"},
    "cpu": {**_DATA, "n_train": None, "n_test": None, "seeds": [0, 1], "model_width": 0.25, "resnet_width": 1.0,
            "epochs": 15, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128, "alpha": 0.5, "n_match": 1000,
            "alignment": "wm"},
    "paper": {**_DATA, "dataset": "cifar10", "n_train": None, "n_test": None, "seeds": [0, 1], "model_width": 1.0,
              "resnet_width": 1.0, "epochs": 160, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5,
              "n_match": 5000, "alignment": "wm"},
}
EXPERIMENTS["vanishing_feature"] = {p: dict(v) for p, v in _VF_CNN.items()}
EXPERIMENTS["merging_through_vf"] = {
    p: {**v, "n_alphas": {"smoke": 3, "cpu": 11, "paper": 21}[p], "mlp_depth": 5, "mlp_width": 32,
        "mlp_epochs": {"smoke": 1, "cpu": 20, "paper": 20}[p], "mlp_dataset": "mnist" if p == "paper" else "mnist5k"}
    for p, v in _VF_CNN.items()}

# Two VGG16 (no norm) edge models with the "preliminaries" recipe (the zoo's cpu edge models), plus one pair
# trained with the paper's weaker weight decay 1e-4 for the recipe comparison.
EXPERIMENTS["enhanced_normalization"] = {
    "smoke": {**EXPERIMENTS["preliminaries"]["smoke"], "n_test": 128, "n_match": 128, "n_alphas": 3, "n_val": 64,
              "n_diag": 32, "zip_alpha": 0.3, "zip_beta": 0.125, "compare_weight_decay": [1e-4]},
    "cpu": {**EXPERIMENTS["preliminaries"]["cpu"], "n_alphas": 11, "n_match": 500, "n_val": 500, "n_diag": 128,
            "zip_alpha": 0.3, "zip_beta": 0.125, "compare_weight_decay": [1e-4]},
    "paper": {**EXPERIMENTS["preliminaries"]["paper"], "n_alphas": 21, "n_val": 5000, "n_diag": 1000,
              "zip_alpha": 0.3, "zip_beta": 0.125, "compare_weight_decay": [5e-4]},
}

# VGG16 (no norm) edge pairs with the "preliminaries" recipe and ResNet20-BN pairs at resnet_width, so the cpu
# profile reuses the zoo's edge models; consecutive seeds form the pairs (cpu: one pair).
# The smoke profile only checks that everything runs (coarse grids). The chapter evaluates ~150 merged
# models, so the cpu profile uses 500 test and 500 calibration images and every other l in the sweeps.
EXPERIMENTS["preserve_first_merging"] = {
    p: {**{k: v for k, v in EXPERIMENTS["preliminaries"][p].items() if k not in ("n_alphas", "alpha")},
        "alpha": 0.5, "resnet_width": {"smoke": 0.25, "cpu": 1.0, "paper": 1.0}[p],
        "pfm_layers": [0, 8] if p == "smoke" else [0, 3, 6, 8, 12],
        "resnet_layers": [0, 10] if p == "smoke" else [0, 6, 10, 13, 19],
        "zip_layers": {"smoke": [2, 8], "cpu": [2, 4, 6, 8, 10, 12], "paper": [2, 4, 6, 8, 10, 12]}[p],
        "sweep_layers": {"smoke": [0, 8, 14], "cpu": [0, 2, 4, 6, 8, 10, 12, 14], "paper": None}[p],
        "n_diag": {"smoke": 64, "cpu": 256, "paper": 1000}[p],
        **({"n_test": 500, "n_match": 500} if p == "cpu" else {})}
    for p in PROFILES}

# Appendix A.8.4: two ViTs merged with direct, WM, AM and OT fusion, and PFM over whole blocks (Table 5).
# The recipe is vfnb.train.TRANSFORMER_RECIPES (Adam, step decay, clipping); the sizes are the chapter's.
EXPERIMENTS["vision_transformers"] = {
    "smoke": {**_DATA, "n_train": 512, "n_test": 128, "seeds": [0, 1], "epochs": 1, "lr": 0.002,
              "weight_decay": 1e-4, "batch_size": 128, "model_width": 0.5, "vit_depth": 2, "num_heads": 3,
              "patch_size": 7, "alpha": 0.5, "n_match": 128, "n_diag": 64, "ot_reg": 0.05, "ot_regs": [0.0]},
    "cpu": {**_DATA, "n_train": None, "n_test": None, "seeds": [0, 1], "epochs": 20, "lr": 0.002,
            "weight_decay": 1e-4, "batch_size": 128, "model_width": 1.0, "vit_depth": 4, "num_heads": 3,
            "patch_size": 7, "alpha": 0.5, "n_match": 500, "n_diag": 256, "ot_reg": 0.1,
            "ot_regs": [0.0, 0.02, 0.05]},
    "paper": {**_DATA, "dataset": "cifar10", "n_train": None, "n_test": None, "seeds": [0, 1], "epochs": 200,
              "lr": 0.001, "weight_decay": 1e-4, "batch_size": 128, "model_width": 4.0, "vit_depth": 7,
              "num_heads": 6, "patch_size": 4, "alpha": 0.5, "n_match": 5000, "n_diag": 1000, "ot_reg": 0.1,
              "ot_regs": [0.0, 0.02, 0.05]},
}

# Beyond the paper: multi-task merging (Sharma, Roy & Dziugaite). Foundations: VGG11 (no norm) trained on the digits
# with the cpu CNN recipe and per-epoch snapshots, exactly appendix A.4's models (seeds 0-5), so the zoo serves both
# chapters. Experts: fine-tuned on each task from a foundation (local: seeds[0]; non-local: seeds[t]).
_TASKS = ["mnist5k-rot90", "mnist5k-inverted", "digits", "mnist5k-0to4", "mnist5k-5to9"]
EXPERIMENTS["multitask_merging"] = {
    "smoke": {**_DATA, "n_train": 512, "n_test": 128, "seeds": [0, 1, 2, 3], "tasks": _TASKS[:4], "model": "vgg11",
              "model_width": 0.0625, "epochs": 1, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128,
              "finetune_epochs": 1, "finetune_lr": 0.05, "task_calib": 64, "scales": [0.5], "ties_density": 0.2,
              "n_grid": 3, "grid_max": 1.2, "n_tsne": 60},
    "cpu": {**_DATA, "n_train": None, "n_test": None, "seeds": [0, 1, 2, 3, 4], "tasks": _TASKS, "model": "vgg11",
            "model_width": 0.125, "epochs": 8, "lr": 0.1, "weight_decay": 1e-2, "batch_size": 128,
            "finetune_epochs": 5, "finetune_lr": 0.05, "task_calib": 300, "scales": [0.2, 0.3, 0.5, 0.7, 1.0],
            "ties_density": 0.2, "n_grid": 7, "grid_max": 1.2, "n_tsne": 300},
    "paper": {**_DATA, "dataset": "mnist", "n_train": None, "n_test": None, "seeds": [0, 1, 2, 3, 4], "tasks": _TASKS,
              "model": "vgg16", "model_width": 1.0, "epochs": 30, "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128,
              "finetune_epochs": 20, "finetune_lr": 0.05, "task_calib": 1000, "scales": [0.2, 0.3, 0.5, 0.7, 1.0],
              "ties_density": 0.2, "n_grid": 13, "grid_max": 1.2, "n_tsne": 1000},
}

# every chapter takes device and cache_dir, listed last (the order of its parameters cell); chapters in
# reading order (_toc.yml; tests/test_chapter_registry.py checks both)
_ORDER = ("introduction", "preliminaries", "experimental_setup", "linear_networks", "vanishing_feature",
          "merging_through_vf", "enhanced_normalization", "preserve_first_merging", "pruning", "closed_forms",
          "training_recipe", "vision_transformers", "multitask_merging", "reproduction", "conclusion")
EXPERIMENTS = {c: {p: {**{k: v for k, v in d.items() if k not in _RUNTIME}, **_RUNTIME}
                   for p, d in EXPERIMENTS[c].items()} for c in _ORDER}

#: Chapters whose edge models come in pairs of consecutive seeds ([0, 1, 2, 3] → (0, 1), (2, 3)); every
#: other chapter with ``seeds`` merges exactly one pair.
SEED_PAIRS = frozenset({"preserve_first_merging", "training_recipe"})
#: Chapters with one foundation seed per task (``len(seeds) == len(tasks)``).
SEED_PER_TASK = frozenset({"multitask_merging"})
#: Numbers of layers bounded by an architecture's L: parameter -> the config key naming the architecture,
#: or the architecture itself.
LAYER_PARAMS: dict[str, str] = {"pfm_layers": "model", "zip_layers": "model", "sweep_layers": "model",
                                "resnet_layers": "resnet20"}
#: Chapters that draw their ``n_diag`` diagnostic images from the ``n_match`` training images (the others
#: draw them from the test images).
DIAG_FROM_MATCH = frozenset({"preserve_first_merging"})


class ConfigError(ValueError):
    """A chapter or run was given an unknown parameter or a bad value."""


class ConfigWarning(UserWarning):
    """A value was accepted but changed (e.g. a size larger than its dataset split, clamped)."""


class Config(Mapping[str, Any]):
    """A validated, read-only set of parameters; read them as ``cfg.name`` or ``cfg["name"]``.

    Build one with :func:`resolve` or :func:`chapter_config`; derive another with :meth:`replace`.
    """

    def __init__(self, experiment: str, values: dict[str, Any]) -> None:
        object.__setattr__(self, "experiment", experiment)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_values":  # not set yet (unpickling, copying): no parameter is private
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config of {self.experiment!r} has no parameter {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; derive a changed copy with cfg.replace(name=value)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Config({self.experiment!r}, {body})"

    def _repr_html_(self) -> str:
        """The parameters once, compactly: a two-pair-per-row table (how notebooks and the book show a config)."""
        import html
        items = [(k, v) for k, v in self._values.items() if v is not None]
        pairs = [items[i:i + 2] for i in range(0, len(items), 2)]
        rows = "".join("<tr>" + "".join(f"<td><code>{html.escape(k)}</code></td><td>{html.escape(repr(v))}</td>"
                                        for k, v in pair) + "</tr>" for pair in pairs)
        return (f'<div class="vfnb-table vfnb-config" style="overflow-x:auto;max-width:100%"><table class="table">'
                f"<caption>Parameters of this run ({html.escape(self.experiment)}, profile "
                f"{html.escape(str(self._values.get('profile')))}). Change them with "
                f"<code>vfnb run CHAPTER -p NAME VALUE</code> or in the notebook's parameters cell.</caption>"
                f"<tbody>{rows}</tbody></table></div>")

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied, validated again by :func:`resolve` (same checks, same
        messages). As in :func:`resolve`, ``None`` restores the profile's default. The profile cannot
        change here (every other value would stay): call ``resolve(experiment, profile=...)`` instead."""
        if "profile" in changes and changes["profile"] != self._values["profile"]:
            raise ConfigError(f"Config.replace keeps every value, so profile={changes['profile']!r} would change "
                              f"nothing else; call vfnb.resolve({self.experiment!r}, profile={changes['profile']!r}) "
                              "for that profile's defaults")
        changes.pop("profile", None)
        values = {k: v for k, v in self._values.items() if k != "profile"}
        values.update(changes)
        return resolve(self.experiment, self._values["profile"], **values)

    @property
    def alphas(self) -> list[float]:
        """The α grid: ``n_alphas`` evenly spaced points from 0 to 1, with ``alpha`` included."""
        grid = [round(i / (self.n_alphas - 1), 10) for i in range(self.n_alphas)]
        if "alpha" in self._values and not any(abs(a - self.alpha) < 1e-9 for a in grid):
            grid = sorted(grid + [float(self.alpha)])
        return grid

    @property
    def cache_path(self) -> Path:
        """The zoo's directory: ``cache_dir``, else ``$VFNB_CACHE``, else ``~/.cache/vfnb/zoo``."""
        return default_cache_dir(self._values.get("cache_dir"))


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where trained models live: the argument, else ``$VFNB_CACHE``, else ``~/.cache/vfnb/zoo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VFNB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vfnb" / "zoo"


def check_value(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` if ``value`` is not allowed for parameter ``name``."""
    spec = PARAMS[name]
    if not spec.check(value):
        raise ConfigError(f"parameter {name!r} = {value!r} is not allowed: it must be {spec.allowed}")


def parse_list(name: str, value: Any) -> Any:
    """A list parameter given as text (``"[2, 3]"``, as papermill's ``-p`` passes it) as a list.

    Python literals are read with :func:`ast.literal_eval`, bare names (``[magnitude, wanda]``) with
    ``yaml.safe_load``; nothing is executed. Other values pass through unchanged. Text that is not a
    list raises :class:`ConfigError` saying how to pass a list.
    """
    if not isinstance(value, str):
        return value
    parsed: Any = value
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        import yaml
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(parsed, tuple):
        parsed = list(parsed)
    if parsed is None or isinstance(parsed, list):
        return parsed
    raise ConfigError(
        f"parameter {name!r} = {value!r} is text that is not a list; it must be {PARAMS[name].allowed}. Papermill's "
        f"-p passes values as text: write the list as '[2, 3]', or pass it typed with papermill -y \"{name}: [2, 3]\" "
        f"or python -m vfnb run <chapter> -p {name} \"[2, 3]\"")


@functools.lru_cache(maxsize=None)
def num_layers(model: str) -> int:
    """L of an architecture as the paper counts it: its conv/linear layers without ResNet shortcut convs
    (VGG16: 14, ResNet20: 20), read from the model itself (built once at a small width)."""
    from .models import build_model
    from .structure import conv_linear_layers

    check_value("model", model)
    return len(conv_linear_layers(build_model(model, width=0.25 if model == "resnet20" else 0.0625)))


def _check_seed_count(experiment: str, values: dict[str, Any]) -> None:
    seeds = values.get("seeds")
    if seeds is None:
        return
    if experiment in SEED_PER_TASK:
        tasks = values.get("tasks") or []
        if len(seeds) != len(tasks):
            raise ConfigError(
                f"parameter 'seeds' = {seeds!r} has {len(seeds)} seeds for {len(tasks)} tasks, but chapter {experiment!r} "
                "fine-tunes the non-local expert of task t from the foundation of seeds[t]; pass one seed per task")
        shape = (values.get("dataset"), )
        if shape[0] not in (None, "mnist5k", "mnist"):
            raise ConfigError(f"parameter 'dataset' = {shape[0]!r} cannot pre-train the foundations: the tasks are 28×28 "
                              "grey digits, so the foundations need mnist5k or mnist")
    elif experiment in SEED_PAIRS:
        if len(seeds) % 2:
            raise ConfigError(
                f"parameter 'seeds' = {seeds!r} has an odd number of seeds, but chapter {experiment!r} merges pairs "
                f"of consecutive seeds ([0, 1, 2, 3] -> (0, 1), (2, 3)), so seed {seeds[-1]} would have no partner; "
                "pass an even number of seeds")
    elif len(seeds) != 2:
        raise ConfigError(
            f"parameter 'seeds' = {seeds!r} has {len(seeds)} seeds, but chapter {experiment!r} merges one pair of "
            f"edge models, so it takes exactly 2 (the others would be ignored); pass e.g. seeds=[{seeds[0]}, "
            f"{seeds[1]}]" + ("; chapter 'preserve_first_merging' averages over several pairs" if len(seeds) > 2
                              else ""))


def _check_layers(experiment: str, values: dict[str, Any]) -> None:
    for name, arch in LAYER_PARAMS.items():
        grid = values.get(name)
        if grid is None:
            continue
        model = values[arch] if arch in values else arch
        total = num_layers(model)
        bad = [v for v in grid if v > total]
        if bad:
            raise ConfigError(
                f"parameter {name!r} = {grid!r} has value(s) {bad} above {total}, the number of conv/linear layers "
                f"of {model} (as the paper counts them); choose values in [0, {total}]")


def _clamp(values: dict[str, Any], name: str, limit: int, what: str) -> None:
    value = values.get(name)
    if value is not None and value > limit:
        warnings.warn(f"parameter {name!r} = {value} is larger than {what} ({limit} images): using {limit}",
                      ConfigWarning, stacklevel=4)
        values[name] = limit


def _check_sizes(experiment: str, values: dict[str, Any]) -> None:
    """Sizes against the dataset's splits: a too large ``n_train`` (part of the zoo key) or ``n_val`` is an
    error; a too large ``n_test``, ``n_match``, ``n_calib`` or ``n_diag`` is clamped to what exists, with a
    :class:`ConfigWarning` naming the parameter and the size used."""
    dataset = values.get("dataset")
    if dataset is None:
        return
    n_train, n_test = SPLIT_SIZES[dataset]
    if values.get("n_train") is not None and values["n_train"] > n_train:
        raise ConfigError(f"parameter 'n_train' = {values['n_train']} is larger than the training split of {dataset} "
                          f"({n_train} images); pass at most {n_train}, or None for the whole split")
    pool, pool_what = n_train, f"the training split of {dataset}"
    if "n_val" in values:
        if values["n_val"] >= n_train:
            raise ConfigError(f"parameter 'n_val' = {values['n_val']} leaves no training images of {dataset} "
                              f"({n_train} in all) for calibration; pass at most {n_train - 1}")
        pool, pool_what = n_train - values["n_val"], f"the training images of {dataset} left after n_val"
    _clamp(values, "n_test", n_test, f"the test split of {dataset}")
    _clamp(values, "n_match", pool, pool_what)
    if "n_match" in values:
        _clamp(values, "n_calib", values["n_match"], "the calibration pool (n_match)")
        too_big = [n for n in values.get("calib_sizes") or [] if n > values["n_match"]]
        if too_big:
            warnings.warn(f"parameter 'calib_sizes' has size(s) {too_big} larger than the calibration pool (n_match = "
                          f"{values['n_match']} images): they are left out (the whole pool is always shown)",
                          ConfigWarning, stacklevel=3)
    if experiment in DIAG_FROM_MATCH:
        _clamp(values, "n_diag", values["n_match"], "the n_match training images it is drawn from")
    else:
        _clamp(values, "n_diag", values.get("n_test") or n_test, "the test images it is drawn from")


#: Checks across parameters, run after every single value passed its own check.
RULES: tuple[Callable[[str, dict[str, Any]], None], ...] = (_check_seed_count, _check_layers, _check_sizes)


def parameter_names(experiment: str) -> list[str]:
    """The names a chapter's ``parameters`` cell declares: ``profile``, then ``EXPERIMENTS[experiment]``'s keys."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    return ["profile", *EXPERIMENTS[experiment]["cpu"]]


def resolve(experiment: str, profile: str = "cpu", **params: Any) -> Config:
    """Turn a chapter's parameters into a validated :class:`Config`.

    ``None`` values take the profile's default; explicit values override it. A list parameter may be
    given as text (``"[2, 3]"``, papermill's ``-p``). Unknown names and bad values raise
    :class:`ConfigError` naming the parameter and what is allowed; so do values that only fail together
    (an odd seed count, layer numbers above the model's L, see :data:`RULES`). Sizes above their
    dataset split are clamped with a :class:`ConfigWarning`.
    """
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    check_value("profile", profile)
    defaults = EXPERIMENTS[experiment][profile]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for experiment {experiment!r}; "
            f"allowed: profile, {', '.join(sorted(defaults))}")
    values = {"profile": profile}
    for name, default in defaults.items():
        value = params.get(name)
        if PARAMS[name].is_list:
            value = parse_list(name, value)
        value = default if value is None else value
        if isinstance(value, tuple):
            value = list(value)
        if name in ("lr", "weight_decay", "alpha", "model_width") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        check_value(name, value)
        values[name] = value
    for rule in RULES:
        rule(experiment, values)
    return Config(experiment, values)


def chapter_config(chapter: str, namespace: Mapping[str, Any]) -> Config:
    """The validated config of a chapter from its notebook's variables: ``chapter_config("pruning", globals())``.

    Only the names ``EXPERIMENTS[chapter]`` declares (and ``profile``) are read; a declared name the
    namespace lacks raises :class:`ConfigError` naming it and the fix (declare it in the parameters cell).
    """
    names = parameter_names(chapter)
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ConfigError(
            f"chapter {chapter!r} takes parameter(s) {', '.join(missing)}, which the notebook does not define; add "
            f"{' and '.join(f'`{n} = None`' for n in missing)} to its parameters cell (it must declare exactly: "
            f"{', '.join(names)})")
    return resolve(chapter, **{n: namespace[n] for n in names})


def describe(experiment: str) -> str:
    """A table of the experiment's parameters and their value under each profile (for docs)."""
    rows = [f"{'parameter':<14} " + " ".join(f"{p:<12}" for p in PROFILES)]
    for name in EXPERIMENTS[experiment]["cpu"]:
        vals = [repr(EXPERIMENTS[experiment][p][name]) for p in PROFILES]
        rows.append(f"{name:<14} " + " ".join(f"{v:<12}" for v in vals))
    return "\n".join(rows)
