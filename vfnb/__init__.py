"""vfnb: the executable edition of *Vanishing Feature: Diagnosing Model Merging and Beyond*.

The public API is re-exported here; each name lives in one module (data flows one way; see
ARCHITECTURE.md): validate · config → data → models → train → zoo → activations → structure → graph
(permutations) → matching (weight, activation, ZipIt!, CCA, optimal transport) → merge (interpolation, bias calibration)
→ normalize (RESET, REPAIR, RESCALE, bias removal, the Fix vocabulary) → pfm (preserve-first merging,
partial zipping) → pruning → diagnose / evaluate / flops → plots → widgets → chapters → book.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, ConfigError, chapter_config, resolve  # noqa: E402
from .data import VisionData, calibration_subset, load_dataset, train_val_split  # noqa: E402
from .models import build_model  # noqa: E402
from .train import TrainConfig, recipe  # noqa: E402
from .zoo import get_or_train  # noqa: E402
from .validate import check_alpha, check_finite, check_same_architecture  # noqa: E402
from . import structure  # noqa: E402
from .structure import Structure, conv_linear_layers, repair_layers, structure_of  # noqa: E402
from .merge import calibrate_bias, interpolate  # noqa: E402
from .evaluate import barrier, evaluate, interpolation_curve  # noqa: E402
from .diagnose import FeatureBias, feature_bias, upper_bound, vf_ratio, weight_scale  # noqa: E402
from .graph import (Permutation, PermutationSpec, UnsupportedOperationError, apply_permutation,  # noqa: E402
                    identity_permutation, permutation_spec, random_permutation)
from .matching import activation_matching, weight_matching  # noqa: E402
from .zipit import Zip, zipit_matching  # noqa: E402
from .cca import LinearAlignment, cca_matching  # noqa: E402
from .transport import TransportAlignment, ot_matching  # noqa: E402
from . import normalize  # noqa: E402
from .normalize import (Fix, layer_stats, permute_stats, remove_bias, repair, rescale, reset_bn_stats,  # noqa: E402
                        target_stats, weighted_stats)
from .pfm import PartialZip, PreserveFirst, partial_zip, preserve_first  # noqa: E402
from .pruning import (apply_masks, prunable_layers, prune, prune_scores, pruning_targets, repair_pruned,  # noqa: E402
                      select_masks, weight_sparsity)
from .flops import count_cost  # noqa: E402
from .diagnose import LogitStats, VFCurve, activation_gap, bn_stats, logit_stats, vf_curve  # noqa: E402
from .merge import average  # noqa: E402
from .multimerge import ManyAlignment, align_many, merge_many  # noqa: E402
from .multitask import (MultiTask, linear_probe, tall_masks, tall_merging, task_arithmetic,  # noqa: E402
                        task_vectors, ties_merging, ties_vector)
from .tact import tact  # noqa: E402

__all__ = [
    "Config", "ConfigError", "resolve", "chapter_config", "check_alpha", "check_finite", "check_same_architecture",
    "structure", "Structure", "structure_of", "Fix", "permute_stats", "VisionData", "load_dataset", "calibration_subset", "train_val_split",
    "build_model", "TrainConfig", "recipe", "get_or_train", "interpolate", "evaluate", "interpolation_curve",
    "barrier", "FeatureBias", "feature_bias", "upper_bound", "vf_ratio", "weight_scale",
    "Permutation", "PermutationSpec", "UnsupportedOperationError", "permutation_spec", "random_permutation",
    "identity_permutation", "apply_permutation", "weight_matching", "activation_matching",
    "Zip", "zipit_matching", "LinearAlignment", "cca_matching", "TransportAlignment", "ot_matching", "normalize", "reset_bn_stats", "repair", "rescale",
    "remove_bias", "calibrate_bias", "layer_stats", "target_stats", "weighted_stats", "conv_linear_layers", "repair_layers",
    "PreserveFirst", "PartialZip", "preserve_first", "partial_zip", "prune", "repair_pruned", "prune_scores", "select_masks", "apply_masks",
    "weight_sparsity", "prunable_layers", "pruning_targets", "count_cost",
    "VFCurve", "LogitStats", "vf_curve", "logit_stats", "bn_stats",
    "average", "ManyAlignment", "align_many", "merge_many", "MultiTask", "task_vectors", "task_arithmetic",
    "ties_merging", "ties_vector", "tall_masks", "tall_merging", "linear_probe", "tact", "activation_gap",
]
