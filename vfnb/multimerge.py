"""Merging N models of one architecture modulo permutation (multi-task merging; related work: Sharma, Roy &
Dziugaite, "The Non-Local Model Merging Problem"; Git Re-Basin's "MergeMany", Ainsworth et al. 2023, Alg. 3).

Two strategies align the models into one basis before they are averaged:

* ``"reference"``: every model is aligned to ``models[reference]`` by one weight or activation matching
  (the star alignment the non-local paper uses for its experts);
* ``"mean"``: Git Re-Basin's MergeMany. Start from the reference alignment; then, in a random order, each
  model is matched (from its original weights) to the average of the *other* aligned models, until a whole
  round changes no permutation (``converged``) or ``max_rounds`` rounds have run. The rounds need not
  converge: weight matching's descent finds local optima, and two models can keep trading places.

The merged model is :func:`vfnb.merge.average` of the aligned models. The alignment keeps each model's
permutation, so anything tied to a model (its foundation, its statistics) can follow it into the common basis.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import example_input as make_example
from .graph import Permutation, apply_permutation, identity_permutation, permutation_spec
from .matching import activation_matching, weight_matching
from .merge import average
from .validate import check_finite, check_same_architecture

__all__ = ["ManyAlignment", "align_many", "merge_many", "STRATEGIES", "METHODS"]

STRATEGIES = ("reference", "mean")
METHODS = ("weight", "activation")


@dataclass
class ManyAlignment:
    """The result of :func:`align_many`: ``permutations[i]`` maps ``models[i]`` into the common basis, and
    ``aligned[i]`` is that permuted copy. With ``strategy="reference"`` the basis is the reference's (its
    permutation is the identity); MergeMany rematches every model, the reference too, so its basis is that of
    the last round. ``rounds`` counts MergeMany's
    rounds (0 for the reference strategy); ``converged`` is False when they stopped at ``max_rounds`` with a
    permutation still changing."""
    permutations: list[Permutation]
    aligned: list[nn.Module]
    strategy: str
    method: str
    rounds: int = 0
    converged: bool = True

    def merge(self, weights: Sequence[float] | None = None) -> nn.Module:
        """The weighted average of the aligned models (:func:`vfnb.merge.average`)."""
        return average(self.aligned, weights)

    def apply(self, i: int, model: nn.Module) -> nn.Module:
        """``model`` (of the same architecture as ``models[i]``, e.g. its foundation) moved by model ``i``'s
        permutation into the common basis."""
        return apply_permutation(model, self.permutations[i])


def _check_models(models: Sequence[nn.Module]) -> list[nn.Module]:
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"align_many/merge_many need at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
        check_same_architecture(models[0], m)
        check_finite(m, f"models[{i}]")
    return models


def align_many(models: Sequence[nn.Module], *, method: str = "weight", strategy: str = "reference",
               reference: int = 0, data: Any = None, example_input: torch.Tensor | None = None,
               max_rounds: int = 10, seed: int = 0, progress: bool = False) -> ManyAlignment:
    """Align ``models`` into one basis: that of ``models[reference]``, or MergeMany's (weight or activation
    matching; see the module docstring for the two strategies). The models are not modified. Activation matching needs ``data``; weight matching needs only an
    ``example_input`` (taken from ``data`` if given, else a zero image of the model's input shape must be
    passed)."""
    models = _check_models(models)
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; choose one of {', '.join(METHODS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(reference, bool) or not isinstance(reference, int) or not 0 <= reference < len(models):
        raise ValueError(f"reference must be the index of one of the {len(models)} models, got {reference!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    if method == "activation" and data is None:
        raise ValueError("activation matching needs data (calibration images); pass data=..., or method='weight'")
    if example_input is None:
        if data is None:
            raise ValueError("weight matching needs example_input (one input batch, for the model's graph) or data")
        example_input = make_example(data, model=models[0])

    def match(target: nn.Module, model: nn.Module) -> Permutation:
        if method == "weight":
            return weight_matching(target, model, example_input, seed=seed)
        return activation_matching(target, model, data, example_input=example_input)

    spec = permutation_spec(models[reference], example_input)
    perms: list[Permutation] = [identity_permutation(spec)] * len(models)
    others = [i for i in range(len(models)) if i != reference]
    for i in tqdm(others, desc="align to the reference", disable=not progress, leave=False):
        perms[i] = match(models[reference], models[i])
    aligned = [copy.deepcopy(m) if i == reference else apply_permutation(m, perms[i]) for i, m in enumerate(models)]
    rounds, converged = 0, True
    if strategy == "mean":
        rng = np.random.default_rng(seed)
        for _ in tqdm(range(max_rounds), desc="MergeMany rounds", disable=not progress, leave=False):
            changed = False
            for i in rng.permutation(len(models)):
                rest = [aligned[j] for j in range(len(models)) if j != i]
                p = match(average(rest), models[i])
                if p != perms[i]:
                    perms[i], aligned[i], changed = p, apply_permutation(models[i], p), True
            rounds += 1
            converged = not changed
            if converged:
                break
    return ManyAlignment(perms, aligned, strategy, method, rounds, converged)


def merge_many(models: Sequence[nn.Module], weights: Sequence[float] | None = None, *, method: str | None = "weight",
               strategy: str = "reference", reference: int = 0, data: Any = None,
               example_input: torch.Tensor | None = None, max_rounds: int = 10, seed: int = 0) -> nn.Module:
    """Merge N models: align them modulo permutation (:func:`align_many`; ``method=None`` skips the alignment,
    direct merging) and return θ = Σ_i w_i θ_i of the aligned models, ``weights`` normalized to sum 1
    (default: equal)."""
    models = _check_models(models)
    if method is None:
        return average(models, weights)
    return align_many(models, method=method, strategy=strategy, reference=reference, data=data,
                      example_input=example_input, max_rounds=max_rounds, seed=seed).merge(weights)
