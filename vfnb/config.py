"""Profiles and validated chapter parameters.

A *profile* (``smoke``, ``cpu``, ``paper``) fixes the sizes of every experiment, so that
notebooks never hard-code them. A chapter's ``parameters`` cell sets ``profile`` and leaves every
other parameter at ``None``; :func:`resolve` fills the ``None`` values from the profile and checks
every value, so that a typo or an out-of-range value stops the run at once with a message that
names the parameter and what is allowed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

PROFILES = ("smoke", "cpu", "paper")
DATASET_NAMES = ("mnist5k", "mnist", "cifar10", "cifar100")


@dataclass(frozen=True)
class Param:
    """One parameter: how to check it, and what the check allows (for messages)."""

    check: Callable[[Any], bool]
    allowed: str
    doc: str = ""


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
    "seeds": Param(_seeds, "a list of >= 2 distinct integers >= 0", "seeds of the edge models"),
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

# --- §5.5 pruning (vfnb.experiments.pruning) --------------------------------------------------------
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
                        "sparsity grid of the accuracy curves and the explorer"),
    "pruners": Param(_distinct(_choice(*PRUNER_NAMES)), f"a list of distinct names from {', '.join(PRUNER_NAMES)}",
                     "one-shot pruners compared"),
    "n_calib": Param(_int(2), "an integer >= 2", "calibration images (training set) for Wanda/Fisher and REPAIR/RESET"),
    "calib_sizes": Param(_distinct(_int(2)), "a list of distinct integers >= 2",
                         "calibration sizes of appendix A.7 (the whole n_match pool is added)"),
    "n_diag": Param(_int(2), "an integer >= 2", "test images for the logit and vanishing-feature diagnostics"),
})

_COMMON = {"dataset": "mnist5k", "data_root": None, "device": "auto", "cache_dir": None}

#: Profile defaults, per experiment. Every key is a parameter of that experiment.
EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    # Paper §4: 8-layer linear MLPs of width 32 on MNIST, Adam 0.01 constant, batch 128,
    # weight decay 1e-4, 5 epochs (appendix A.3 and Table 2).
    "linear": {
        "smoke": {**_COMMON, "n_train": 512, "n_test": 256, "seeds": [0, 1], "depth": 8, "width": 32,
                  "epochs": 1, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5,
                  "n_alphas": 5},
        # 4,000 images give 32 steps an epoch; 20 epochs (Table 2's MNIST budget) come closer to the
        # paper's 5 epochs over 60,000 images than 5 epochs would.
        "cpu": {**_COMMON, "n_train": None, "n_test": None, "seeds": [0, 1], "depth": 8, "width": 32,
                "epochs": 20, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5,
                "n_alphas": 11},
        "paper": {**_COMMON, "dataset": "mnist", "n_train": None, "n_test": None, "seeds": [0, 1],
                  "depth": 8, "width": 32, "epochs": 5, "lr": 0.01, "weight_decay": 1e-4,
                  "batch_size": 128, "alpha": 0.5, "n_alphas": 21},
    },
    # Paper §2: direct, weight-matching and activation-matching merging of two VGG16 edge models.
    # The cpu sizes follow vfnb.train.PROFILE_CNN (width 0.25, 15 epochs, lr 0.05, weight decay 5e-3).
    "merging": {
        "smoke": {**_COMMON, "n_train": 512, "n_test": 256, "seeds": [0, 1], "model": "vgg16", "model_width": 0.0625,
                  "norm": "none", "epochs": 1, "lr": 0.05, "weight_decay": 5e-3, "batch_size": 128,
                  "alpha": 0.5, "n_alphas": 5, "n_match": 256},
        "cpu": {**_COMMON, "n_train": None, "n_test": None, "seeds": [0, 1], "model": "vgg16", "model_width": 0.25,
                "norm": "none", "epochs": 15, "lr": 0.05, "weight_decay": 5e-3, "batch_size": 128,
                "alpha": 0.5, "n_alphas": 11, "n_match": 1000},
        "paper": {**_COMMON, "dataset": "cifar10", "n_train": None, "n_test": None, "seeds": [0, 1],
                  "model": "vgg16", "model_width": 1.0, "norm": "none", "epochs": 160, "lr": 0.1,
                  "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5, "n_alphas": 21, "n_match": 5000},
    },
}


# Paper §5.5 and appendix A.7: one-shot pruning of VGG16-LN (then REPAIR) and VGG16-BN (then RESET),
# one trained model each (seed 0; the cpu recipe of "merging", so the zoo's edge models are reused).
_PRUNE_SIZES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
EXPERIMENTS["pruning"] = {
    "smoke": {**_COMMON, "n_train": 512, "n_test": 256, "seed": 0, "model": "vgg16", "model_width": 0.0625,
              "epochs": 1, "lr": 0.05, "weight_decay": 5e-3, "batch_size": 128, "n_match": 256, "n_calib": 64,
              "calib_sizes": [32], "sparsity": 0.9, "sparsities": [0.5, 0.9], "pruners": list(PRUNER_NAMES),
              "n_diag": 32},
    # n_match 4000 = the whole mnist5k training split: appendix A.7's "full" calibration set. Every one of
    # the 2 × 4 × 11 pruned models is evaluated twice (before/after the fix), so a stratified half of the
    # test split (500 images) keeps the run to a few minutes on 2 cores.
    "cpu": {**_COMMON, "n_train": None, "n_test": 500, "seed": 0, "model": "vgg16", "model_width": 0.25,
            "epochs": 15, "lr": 0.05, "weight_decay": 5e-3, "batch_size": 128, "n_match": 4000, "n_calib": 256,
            "calib_sizes": [64, 128, 256], "sparsity": 0.8, "sparsities": _PRUNE_SIZES,
            "pruners": list(PRUNER_NAMES), "n_diag": 128},
    "paper": {**_COMMON, "dataset": "cifar10", "n_train": None, "n_test": None, "seed": 0, "model": "vgg16",
              "model_width": 1.0, "epochs": 160, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 128,
              "n_match": 50000, "n_calib": 256, "calib_sizes": [64, 128, 256], "sparsity": 0.8,
              "sparsities": _PRUNE_SIZES, "pruners": list(PRUNER_NAMES), "n_diag": 1000},
}

# --- §5.1 / §5.2 vanishing feature (vfnb.experiments.vanishing) ----------------------------------------
PARAMS.update({
    "alignment": Param(_choice("direct", "wm", "am"), "one of direct, wm, am",
                       "how edge model 1 is aligned before merging (weight / activation matching)"),
    "resnet_width": Param(_float(0.0, 8.0, lo_open=True), "a float in (0, 8]", "ResNet20 width multiplier"),
    "mlp_depth": Param(_int(2, 64), "an integer in [2, 64]", "layers of the linear MLPs of Fig. 3D"),
    "mlp_width": Param(_int(1, 4096), "an integer in [1, 4096]", "width of the linear MLPs of Fig. 3D"),
    "mlp_epochs": Param(_int(1, 1000), "an integer in [1, 1000]", "training epochs of the linear MLPs of Fig. 3D"),
})
# VGG16 none/bn/ln at model_width and ResNet20 bn/ln at resnet_width, with the "merging" CNN recipe, so the
# cpu profile reuses the zoo's edge models. Fig. 3D: linear MLPs (Adam 0.01, the linear chapter's 20 epochs).
_VF_CNN = {
    # smoke: the shared smoke edge models; 128 test / calibration images keep the ten models' diagnostics fast
    "smoke": {**_COMMON, "n_train": 512, "n_test": 128, "seeds": [0, 1], "model_width": 0.0625, "resnet_width": 0.25,
              "epochs": 1, "lr": 0.05, "weight_decay": 5e-3, "batch_size": 128, "alpha": 0.5, "n_match": 128,
              "alignment": "wm"},
    "cpu": {**_COMMON, "n_train": None, "n_test": None, "seeds": [0, 1], "model_width": 0.25, "resnet_width": 1.0,
            "epochs": 15, "lr": 0.05, "weight_decay": 5e-3, "batch_size": 128, "alpha": 0.5, "n_match": 1000,
            "alignment": "wm"},
    "paper": {**_COMMON, "dataset": "cifar10", "n_train": None, "n_test": None, "seeds": [0, 1], "model_width": 1.0,
              "resnet_width": 1.0, "epochs": 160, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 128, "alpha": 0.5,
              "n_match": 5000, "alignment": "wm"},
}
EXPERIMENTS["vanishing_feature"] = {p: dict(v) for p, v in _VF_CNN.items()}
EXPERIMENTS["merging_vf"] = {
    p: {**v, "n_alphas": {"smoke": 3, "cpu": 11, "paper": 21}[p], "mlp_depth": 5, "mlp_width": 32,
        "mlp_epochs": {"smoke": 1, "cpu": 20, "paper": 5}[p],
        **({"dataset": "cifar10"} if p == "paper" else {})}
    for p, v in _VF_CNN.items()}

# --- §5.3 enhanced normalization, ZipIt! (vfnb.experiments.normalization) ------------------------------
PARAMS.update({
    "n_val": Param(_int(1), "an integer >= 1",
                   "training images held out from calibration to choose k for bias removal (never test images)"),
    "zip_alpha": Param(_float(0.0, 1.0), "a float in [0, 1]", "ZipIt!'s α: similarity decay of a merged feature"),
    "zip_beta": Param(_float(0.0, 1.0), "a float in [0, 1]", "ZipIt!'s β: same-model merge budget"),
    "compare_weight_decay": Param(lambda v: isinstance(v, (list, tuple)) and all(_float(0.0, 1.0)(w) for w in v),
                                  "a list of floats in [0, 1] (may be empty)",
                                  "weight decays of extra edge-model pairs for the recipe comparison (A.4)"),
})
# Two VGG16 (no norm) edge models with the "merging" recipe (the zoo's cpu edge models), plus one pair
# trained with the paper's weaker weight decay 1e-4 for the recipe comparison.
EXPERIMENTS["normalization"] = {
    "smoke": {**EXPERIMENTS["merging"]["smoke"], "n_test": 128, "n_match": 128, "n_alphas": 3, "n_val": 64,
              "n_diag": 32, "zip_alpha": 0.3, "zip_beta": 0.125, "compare_weight_decay": [1e-4]},
    "cpu": {**EXPERIMENTS["merging"]["cpu"], "n_alphas": 11, "n_match": 500, "n_val": 500, "n_diag": 128,
            "zip_alpha": 0.3, "zip_beta": 0.125, "compare_weight_decay": [1e-4]},
    "paper": {**EXPERIMENTS["merging"]["paper"], "n_alphas": 21, "n_val": 5000, "n_diag": 1000, "zip_alpha": 0.3,
              "zip_beta": 0.125, "compare_weight_decay": [5e-4]},
}

# --- §5.4 Preserve-First Merging (vfnb.experiments.pfm) ------------------------------------------------
PARAMS.update({
    "pfm_layers": Param(_distinct(_int(0)), "a list of distinct integers >= 0 (at most L of the model)",
                        "numbers l of preserved layers in the PFM tables (Table 1 uses 0, 3, 6, 8, 12 of 14)"),
    "resnet_layers": Param(_distinct(_int(0)), "a list of distinct integers >= 0 (at most 20)",
                           "numbers l of preserved layers in the ResNet20 PFM table (appendix Table 7)"),
    "zip_layers": Param(_distinct(_int(0)), "a list of distinct integers >= 0 (at most L of the model)",
                        "numbers of unmerged layers compared for PFM and partial zipping (appendix A.8.2)"),
    "sweep_layers": Param(_optional(_distinct(_int(0))), "a list of distinct integers >= 0, or None for every l",
                          "the l grid of Fig. 4 left and of the preserved-layers explorer (None: 0, 1, ..., L)"),
})
# VGG16 (no norm) edge pairs with the "merging" recipe and ResNet20-BN pairs at resnet_width, so the cpu
# profile reuses the zoo's edge models; consecutive seeds form the pairs (cpu: one pair).
# The smoke profile only checks that everything runs (coarse grids). The chapter evaluates ~150 merged
# models, so the cpu profile uses 500 test and 500 calibration images and every other l in the sweeps.
EXPERIMENTS["pfm"] = {
    p: {**{k: v for k, v in EXPERIMENTS["merging"][p].items() if k not in ("n_alphas", "alpha")}, "alpha": 0.5,
        "resnet_width": {"smoke": 0.25, "cpu": 1.0, "paper": 1.0}[p],
        "pfm_layers": [0, 8] if p == "smoke" else [0, 3, 6, 8, 12],
        "resnet_layers": [0, 10] if p == "smoke" else [0, 6, 10, 13, 19],
        "zip_layers": {"smoke": [2, 8], "cpu": [2, 4, 6, 8, 10, 12], "paper": [2, 4, 6, 8, 10, 12]}[p],
        "sweep_layers": {"smoke": [0, 8, 14], "cpu": [0, 2, 4, 6, 8, 10, 12, 14], "paper": None}[p],
        "n_diag": {"smoke": 64, "cpu": 256, "paper": 1000}[p],
        **({"n_test": 500, "n_match": 500} if p == "cpu" else {})}
    for p in ("smoke", "cpu", "paper")}

class ConfigError(ValueError):
    """A chapter or run was given an unknown parameter or a bad value."""


class Config(Mapping[str, Any]):
    """A validated, read-only set of parameters; read them as ``cfg.name`` or ``cfg["name"]``."""

    def __init__(self, experiment: str, values: dict[str, Any]) -> None:
        object.__setattr__(self, "experiment", experiment)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config of {self.experiment!r} has no parameter {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; pass new values to vfnb.config.resolve")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Config({self.experiment!r}, {body})"

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


def resolve(experiment: str, profile: str = "cpu", **params: Any) -> Config:
    """Turn a chapter's parameters into a validated :class:`Config`.

    ``None`` values take the profile's default; explicit values override it. Unknown names and
    bad values raise :class:`ConfigError` naming the parameter and what is allowed.
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
        value = default if value is None else value
        if isinstance(value, tuple):
            value = list(value)
        if name in ("lr", "weight_decay", "alpha", "model_width") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        check_value(name, value)
        values[name] = value
    return Config(experiment, values)


def describe(experiment: str) -> str:
    """A table of the experiment's parameters and their value under each profile (for docs)."""
    rows = [f"{'parameter':<14} " + " ".join(f"{p:<12}" for p in PROFILES)]
    for name in EXPERIMENTS[experiment]["cpu"]:
        vals = [repr(EXPERIMENTS[experiment][p][name]) for p in PROFILES]
        rows.append(f"{name:<14} " + " ".join(f"{v:<12}" for v in vals))
    return "\n".join(rows)
