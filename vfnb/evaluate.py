"""Accuracy, loss, interpolation curves and the linear barrier (paper Fig. 6 caption)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .activations import labelled_batches
from .merge import interpolate
from .validate import check_alpha, check_finite


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int = 1000) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (in eval mode) on ``data``."""
    check_finite(model)
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for x, y in labelled_batches(data, batch_size, model, need_labels=True):
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(data), "loss": loss / len(data)}


def interpolation_curve(model_a: nn.Module, model_b: nn.Module, data: Any, alphas: Sequence[float],
                        progress: bool = True,
                        after: Callable[[nn.Module, float], nn.Module] | None = None) -> dict[str, np.ndarray]:
    """Accuracy and loss of θ_α = (1−α)θ_a + αθ_b for every α in ``alphas``.

    ``after(merged, α)``, if given, post-processes each merged model before it is evaluated (e.g. REPAIR
    or RESET); the merged model is a fresh copy, so ``after`` may modify it in place."""
    alphas = [check_alpha(a) for a in alphas]
    acc, loss = [], []
    for a in tqdm(alphas, desc="interpolate", disable=not progress, leave=False):
        merged = interpolate(model_a, model_b, a)
        r = evaluate(merged if after is None else after(merged, a), data)
        acc.append(r["accuracy"])
        loss.append(r["loss"])
    return {"alpha": np.array(alphas), "accuracy": np.array(acc), "loss": np.array(loss)}


def barrier(alphas: Sequence[float], accuracy: Sequence[float]) -> float:
    """The linear barrier B = max_α (1−α)·Acc(f₀) + α·Acc(f₁) − Acc(f_α) (paper Fig. 6).

    ``alphas`` must include 0 and 1, whose accuracies are the edge models'.
    """
    a, acc = np.asarray(alphas, float), np.asarray(accuracy, float)
    if a.shape != acc.shape or a.ndim != 1:
        raise ValueError("alphas and accuracy must be 1-D sequences of the same length")
    try:
        i0, i1 = int(np.flatnonzero(np.isclose(a, 0))[0]), int(np.flatnonzero(np.isclose(a, 1))[0])
    except IndexError:
        raise ValueError("the α grid must include 0 and 1 (the edge models)") from None
    return float(np.max((1 - a) * acc[i0] + a * acc[i1] - acc))
