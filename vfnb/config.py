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
