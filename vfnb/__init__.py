"""vfnb: the executable edition of *Vanishing Feature: Diagnosing Model Merging and Beyond*.

The public API is re-exported here; each name lives in one module (data flows left to right):
config → data → models → train → zoo → graph → matching → merge → diagnose / evaluate → plots
→ widgets → book.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, ConfigError, resolve  # noqa: E402
from .data import VisionData, calibration_subset, load_dataset, train_val_split  # noqa: E402
from .models import build_model  # noqa: E402
from .train import TrainConfig, recipe  # noqa: E402
from .zoo import get_or_train  # noqa: E402
from .merge import interpolate  # noqa: E402
from .evaluate import barrier, evaluate, interpolation_curve  # noqa: E402
from .diagnose import FeatureBias, feature_bias, upper_bound, vf_ratio, weight_scale  # noqa: E402
from .graph import (Permutation, PermutationSpec, UnsupportedOperationError, apply_permutation,  # noqa: E402
                    identity_permutation, permutation_spec, random_permutation)
from .matching import activation_matching, weight_matching  # noqa: E402

__all__ = [
    "Config", "ConfigError", "resolve", "VisionData", "load_dataset", "calibration_subset", "train_val_split",
    "build_model", "TrainConfig", "recipe", "get_or_train", "interpolate", "evaluate", "interpolation_curve",
    "barrier", "FeatureBias", "feature_bias", "upper_bound", "vf_ratio", "weight_scale",
    "Permutation", "PermutationSpec", "UnsupportedOperationError", "permutation_spec", "random_permutation",
    "identity_permutation", "apply_permutation", "weight_matching", "activation_matching",
]
