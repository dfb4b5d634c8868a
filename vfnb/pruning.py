"""One-shot pruning and post-pruning normalization (paper §5.5, appendix A.7).

:func:`prune` zeroes a fraction of the conv/linear *weights* of a trained model in one shot and
returns the pruned copy with its masks; :func:`repair_pruned` then applies REPAIR, RESCALE or
RESET with the unpruned model as the only reference (Eq. 2 with weight 1), which counters the
vanishing feature that pruning causes (paper Fig. 5).

What is pruned: the ``weight`` of every conv and linear layer (optionally without the
first one and/or the classifier). Biases and normalization parameters are never pruned.

Importance scores (a weight with a smaller score is pruned first):

* ``magnitude``: :math:`|W_{ij}|` (Han et al. 2015, "Learning both weights and connections").
* ``wanda``: :math:`|W_{ij}|\\cdot\\|X_j\\|_2` (Sun et al. 2024, "A simple and effective pruning
  approach for LLMs", Eq. 1), where :math:`X_j` is input feature ``j`` of the layer over all
  calibration samples and positions. For a convolution, the input features are the columns of the
  *unfolded* input (``in_channels/groups × kh × kw`` per output channel, exactly the patches the
  convolution multiplies), so a conv is treated as the linear layer it is on its patches; padding
  positions count as zeros. The norm is divided by √n_samples as in Wanda's reference code (the
  ranking inside a row does not depend on it). Norms are measured on the *unpruned* model in one
  pass (Wanda's reference code feeds each transformer block the outputs of the already pruned
  blocks before it; for these small CNNs the one-pass variant keeps the method strictly one-shot).
* ``fisher``: the diagonal-Fisher saliency :math:`\\tfrac12 F_{ii} w_i^2` with
  :math:`F_{ii} = \\frac1n\\sum_x (\\partial \\ell(x, y)/\\partial w_i)^2` the empirical Fisher
  (per-sample squared gradients of the cross-entropy on labelled calibration data). This is the
  Optimal Brain Damage saliency (LeCun et al. 1990) with the Fisher as the Hessian approximation,
  the "diagonal Fisher" baseline of WoodFisher (Singh & Alistarh 2020, §4).

Scopes (which weights compete with each other):

* ``global``: all prunable weights of the network in one ranking;
* ``layerwise``: every layer loses the same fraction of its weights;
* ``row``: every output row (a linear layer's output unit, a conv's output channel) loses the
  same fraction; Wanda's comparison group, and its default.

Sparsity is exact: the masks remove exactly ``round(sparsity · N)`` of the ``N`` prunable
weights. Per-layer and per-row counts are allotted by largest remainder so that they add up to
that total, and ties between equal scores are broken by position (the earlier weight is pruned
first), so the result is deterministic.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from . import normalize
from .activations import labelled_batches
from .data import VisionData, calibration_subset
from .normalize import Fix
from .structure import BN_TYPES, WEIGHT_TYPES
from .validate import UnsupportedOperationError, check_finite, check_same_architecture

__all__ = ["PRUNE_METHODS", "SCOPES", "REPAIR_METHODS", "DEFAULT_SCOPE", "prunable_layers", "prune_scores",
           "select_masks", "apply_masks", "weight_sparsity", "prune", "pruning_targets", "repair_pruned"]

PRUNE_METHODS = ("magnitude", "wanda", "fisher")
SCOPES = ("global", "layerwise", "row")
#: The post-pruning fixes :func:`repair_pruned` accepts.
REPAIR_METHODS = (Fix.REPAIR, Fix.RESCALE, Fix.RESET)
#: The scope each method uses when none is given.
DEFAULT_SCOPE = {"magnitude": "global", "wanda": "row", "fisher": "global"}
#: Layers whose weights are pruned: every conv/linear layer (:data:`vfnb.structure.WEIGHT_TYPES`).
PRUNABLE_TYPES = WEIGHT_TYPES
#: Layers whose data-dependent scores (Wanda's input norms, Fisher's per-sample gradients) are implemented.
_SCORED_TYPES = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------- checks

def _check_method(method: str) -> str:
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")
    return method


def _check_scope(scope: str | None, method: str) -> str:
    if scope is None:
        return DEFAULT_SCOPE[method]
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)} "
                         f"(or None for the method's default, {DEFAULT_SCOPE[method]!r} for {method})")
    return scope


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of prunable weights set to zero), got "
                         f"{sparsity}; 1 would remove every weight")
    return float(sparsity)


def _check_n_samples(n_samples: int | None) -> int | None:
    if n_samples is None:
        return None
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, or None for all of the data, got {n_samples!r}")
    return n_samples


# --------------------------------------------------------------------------- layers

def prunable_layers(model: nn.Module, exclude_first: bool = False, exclude_classifier: bool = False) -> list[str]:
    """Names of the conv/linear modules whose weights :func:`prune` may zero, in definition order.

    ``exclude_first`` drops the first conv/linear module and ``exclude_classifier`` the last one
    (definition order, which is the execution order of every vfnb model and of the usual
    torchvision CNNs). ResNet shortcut convs are prunable (the paper prunes "all convolutional and
    linear layers").
    """
    names = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no conv or linear layers to prune")
    chosen = names[1 if exclude_first else 0: len(names) - (1 if exclude_classifier else 0)]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has {len(names)} conv/linear layer(s); excluding the first "
                         f"and/or the classifier leaves none to prune")
    return chosen


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None, exclude_first: bool,
                    exclude_classifier: bool) -> list[str]:
    if layers is None:
        return prunable_layers(model, exclude_first, exclude_classifier)
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of module names, not a single string; wrap it in a list")
    modules = dict(model.named_modules())
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("layers is empty: name at least one conv/linear module to prune, or pass None")
    for name in layers:
        if name not in modules:
            raise ValueError(f"model has no module {name!r}; prunable ones: {prunable_layers(model)}")
        if not isinstance(modules[name], PRUNABLE_TYPES):
            raise ValueError(f"module {name!r} is a {type(modules[name]).__name__}; only conv and linear "
                             "weights are pruned (biases and norm parameters never are)")
    if exclude_first or exclude_classifier:
        raise ValueError("pass either an explicit layers list or exclude_first/exclude_classifier, not both")
    return layers


# --------------------------------------------------------------------------- data

# --------------------------------------------------------------------------- scores

def _conv_shifts(conv: nn.Conv2d, x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For every kernel offset (i, j): the input values that offset multiplies at every output
    position, as a strided view ``[N, C, H_out, W_out]`` of the padded input (the columns of
    im2col, without materializing them)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def _conv_input_sq(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Σ over samples and output positions of the squared input feature that each weight of a
    conv multiplies (the squared columns of the unfolded input): a ``[in_channels, kh, kw]`` tensor.
    Padding positions count as zeros (or as the reflected/replicated/circular values)."""
    x = x.detach().double()
    out = torch.zeros(x.shape[1], *conv.kernel_size, dtype=torch.float64, device=x.device)
    for i, j, xs in _conv_shifts(conv, x):
        out[:, i, j] = xs.pow(2).sum((0, 2, 3))
    return out


@torch.no_grad()
def _wanda_scores(model: nn.Module, layers: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    sq: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            s = _conv_input_sq(mod, x) if isinstance(mod, nn.Conv2d) else \
                x.detach().double().reshape(-1, x.shape[-1]).pow(2).sum(0)
            sq[name] = sq[name] + s if name in sq else s
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in layers]
    was_training = model.training
    n = 0
    try:
        model.eval()
        for x, _ in batches:
            model(x)
            n += len(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("the calibration data yielded no samples")
    missing = [name for name in layers if name not in sq]
    if missing:
        raise ValueError(f"layers {missing} were not executed by the forward pass, so Wanda has no input norms "
                         "for them; exclude them with layers=...")
    scores = {}
    for name in layers:
        mod = modules[name]
        norm = (sq[name] / n).sqrt()  # ‖X_j‖₂ / √n_samples
        w = mod.weight.detach().abs().double()
        if isinstance(mod, nn.Conv2d):
            g = mod.groups
            per_group = norm.reshape(g, -1)  # [groups, in/groups · kh · kw]
            rows = per_group.repeat_interleave(mod.out_channels // g, dim=0)
            scores[name] = (w.reshape(mod.out_channels, -1) * rows).reshape(w.shape)
        else:
            scores[name] = w * norm[None, :]
    return scores


def _per_sample_sq_grad(mod: nn.Module, x: torch.Tensor, g: torch.Tensor, budget: float = 2.5e7) -> torch.Tensor:
    """Σ_n (∂ℓ_n/∂W)² from a layer's input ``x`` and output gradient ``g`` (one row per sample).

    The per-sample weight gradient of a linear map is Σ_positions g ⊗ x (Goodfellow 2015,
    "Efficient per-example gradient computations"); for a conv, one such product per kernel
    offset with the input shifted by that offset (im2col without materializing it).
    """
    x, g = x.detach(), g.detach()
    per_sample = 2 * mod.weight.numel() + g[0].numel() + x[0].numel()
    chunk = int(max(1, budget // per_sample))  # ≤ ~100-200 MB of intermediates at a time
    total = torch.zeros(mod.weight.shape, dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        xs, gs = x[s:s + chunk], g[s:s + chunk]
        n = len(xs)
        if isinstance(mod, nn.Conv2d):
            grp = mod.groups
            gg = gs.reshape(n, grp, mod.out_channels // grp, -1)                    # [n, g, out/g, P]
            per = torch.empty(n, *mod.weight.shape, dtype=gs.dtype, device=gs.device)
            for i, j, sh in _conv_shifts(mod, xs):
                u = sh.reshape(n, grp, mod.in_channels // grp, -1)                  # [n, g, in/g, P]
                per[..., i, j] = torch.einsum("ngop,ngcp->ngoc", gg, u).reshape(n, mod.out_channels, -1)
        else:
            per = torch.einsum("nto,nti->noi", gs.reshape(n, -1, gs.shape[-1]), xs.reshape(n, -1, xs.shape[-1]))
        total += per.pow(2).sum(0).double()
    return total


def _fisher_scores(model: nn.Module, layers: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """½·F_ii·w_i² with F the empirical Fisher (mean per-sample squared gradient), in eval mode.

    One forward/backward pass per batch: the hooks keep each layer's input and output gradient,
    from which the per-sample weight gradients follow exactly (in eval mode the samples of a
    batch do not interact, so the gradient of the summed loss w.r.t. a sample's output is that
    sample's own).
    """
    modules = dict(model.named_modules())
    total = {n: torch.zeros(modules[n].weight.shape, dtype=torch.float64, device=modules[n].weight.device)
             for n in layers}
    saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            saved.setdefault(name, []).append((inputs[0].detach(), output))
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    n_seen = 0
    try:
        model.eval()
        for x, y in batches:
            if y is None:
                raise ValueError("Fisher pruning needs labels: pass (x, y) batches or a VisionData")
            saved.clear()
            with torch.enable_grad():
                out = model(x)
                loss = F.cross_entropy(out, y, reduction="sum")
                missing = [n for n in layers if n not in saved]
                if missing:
                    raise ValueError(f"layers {missing} were not executed by the forward pass; exclude them "
                                     "with layers=...")
                shared = [n for n in layers if len(saved[n]) > 1]
                if shared:
                    raise ValueError(f"layers {shared} run more than once per forward pass (shared weights); "
                                     "per-sample Fisher needs each pruned layer to run once")
                outs = [saved[n][0][1] for n in layers]
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
            for n, g in zip(layers, grads):
                if g is not None:
                    total[n] += _per_sample_sq_grad(modules[n], saved[n][0][0], g)
            n_seen += len(x)
    finally:
        saved.clear()
        model.train(was_training)
        for h in handles:
            h.remove()
    if n_seen == 0:
        raise ValueError("the calibration data yielded no samples")
    return {n: 0.5 * (total[n] / n_seen) * modules[n].weight.detach().double().pow(2) for n in layers}


def prune_scores(model: nn.Module, method: str = "magnitude", data: Any = None, layers: Sequence[str] | None = None,
                 n_samples: int | None = 256, batch_size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Importance of every prunable weight (paper §5.5 pruners), one tensor per layer shaped like its weight.

    ``magnitude``: |W|; ``wanda``: |W_ij|·‖X_j‖₂/√n over the (unfolded) layer inputs on ``data``;
    ``fisher``: ½·F_ii·w_i² with the empirical diagonal Fisher on labelled ``data``. See the module
    docstring for the definitions and references. Scores are float64; smaller is pruned first.
    """
    method = _check_method(method)
    n_samples = _check_n_samples(n_samples)
    check_finite(model)
    layers = _resolve_layers(model, layers, False, False)
    modules = dict(model.named_modules())
    if method == "magnitude":
        return {n: modules[n].weight.detach().abs().double() for n in layers}
    if data is None:
        raise ValueError(f"{method} pruning needs calibration data: pass data=... (a VisionData, a tensor of inputs"
                         f"{'' if method == 'wanda' else ' with labels'} or an iterable of batches); "
                         "magnitude pruning needs none")
    other = [n for n in layers if not isinstance(modules[n], _SCORED_TYPES)]
    if other:
        raise UnsupportedOperationError(f"{method} pruning is implemented for nn.Conv2d and nn.Linear; {other[0]!r} is "
                                        f"a {type(modules[other[0]]).__name__}. Use method='magnitude' or exclude it "
                                        "with layers=...")
    batches = labelled_batches(data, batch_size, model, n_samples, seed, need_labels=method == "fisher")
    if method == "wanda":
        return _wanda_scores(model, layers, batches)
    return _fisher_scores(model, layers, batches)


# --------------------------------------------------------------------------- selection

def _allot(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` pruned weights over groups proportionally to ``sizes``, exactly (largest
    remainder with integer arithmetic; ties go to the earlier group)."""
    n = sum(sizes)
    base = [total * s // n for s in sizes]
    rest = [total * s % n for s in sizes]
    extra = total - sum(base)
    for i in sorted(range(len(sizes)), key=lambda i: (-rest[i], i))[:extra]:
        base[i] += 1
    return base


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask of a flat tensor that drops its ``k`` smallest entries (ties: earlier first)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.argsort(scores, stable=True)[:k]] = False
    return keep


def select_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) that drop exactly ``round(sparsity·N)`` of the ``N`` scored weights,
    lowest scores first, ranked over the whole network (``global``), within each layer
    (``layerwise``) or within each output row (``row``)."""
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if not scores:
        raise ValueError("no scores given: nothing to prune")
    names = list(scores)
    flat = [scores[n].reshape(-1) for n in names]
    sizes = [t.numel() for t in flat]
    k = round(sparsity * sum(sizes))
    if scope == "global":
        keep = _lowest(torch.cat(flat), k).split(sizes)
        return {n: m.reshape(scores[n].shape) for n, m in zip(names, keep)}
    if scope == "layerwise":
        return {n: _lowest(t, c).reshape(scores[n].shape) for n, t, c in zip(names, flat, _allot(k, sizes))}
    rows = [scores[n].reshape(scores[n].shape[0], -1) for n in names]
    counts = _allot(k, [r.shape[1] for r in rows for _ in range(r.shape[0])])
    out, i = {}, 0
    for n, r in zip(names, rows):
        c = torch.tensor(counts[i:i + r.shape[0]], device=r.device)[:, None]
        i += r.shape[0]
        order = torch.argsort(r, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(r.shape[1], device=r.device).expand_as(order))
        out[n] = (rank >= c).reshape(scores[n].shape)
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], inplace: bool = False) -> nn.Module:
    """Zero the weights where ``masks[name]`` is False (a copy unless ``inplace``); biases untouched."""
    out = model if inplace else copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, mask in masks.items():
        if name not in modules or not isinstance(modules[name], PRUNABLE_TYPES):
            raise ValueError(f"mask for {name!r}, which is not a conv/linear module of this model")
        w = modules[name].weight
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    return out


def weight_sparsity(model: nn.Module, layers: Sequence[str] | None = None) -> float:
    """Fraction of exactly-zero entries among the weights of ``layers`` (default: every conv/linear)."""
    modules = dict(model.named_modules())
    names = prunable_layers(model) if layers is None else list(layers)
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    total = sum(modules[n].weight.numel() for n in names)
    return zeros / total


# --------------------------------------------------------------------------- the two entry points

def prune(model: nn.Module, sparsity: float, method: str = "magnitude", data: Any = None, scope: str | None = None,
          *, layers: Sequence[str] | None = None, exclude_first: bool = False, exclude_classifier: bool = False,
          n_samples: int | None = 256, batch_size: int = 128, seed: int = 0
          ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One-shot pruning (paper §5.5): a pruned copy of ``model`` and its keep-masks (True = kept).

    ``method``: ``magnitude`` (no data), ``wanda`` or ``fisher`` (calibration ``data``: a
    VisionData, a tensor of inputs, or an iterable of x / (x, y) batches; Fisher needs labels).
    ``scope``: ``global``, ``layerwise`` or ``row``; None uses the method's default (global for
    magnitude and Fisher, per output row for Wanda). Exactly ``round(sparsity·N)`` of the ``N``
    prunable weights are zeroed (ties broken by position). ``layers`` names the prunable modules
    explicitly; otherwise every conv/linear, without the first (``exclude_first``) and/or the
    classifier (``exclude_classifier``). ``n_samples`` calibration samples are used (a stratified
    subset, chosen with ``seed``, of a larger VisionData; None: all). The input model is unchanged.
    """
    method = _check_method(method)
    sparsity = _check_sparsity(sparsity)
    scope = _check_scope(scope, method)
    check_finite(model)
    n_samples = _check_n_samples(n_samples)
    if method != "magnitude" and data is None:
        raise ValueError(f"{method} pruning needs calibration data: pass data=... (for example "
                         "vfnb.calibration_subset(train, 256)); magnitude pruning needs none")
    layers = _resolve_layers(model, layers, exclude_first, exclude_classifier)
    scores = prune_scores(model, method, data, layers=layers, n_samples=n_samples, batch_size=batch_size, seed=seed)
    masks = select_masks(scores, sparsity, scope)
    pruned = apply_masks(model, masks)
    pruned.train(model.training)
    return pruned, masks


def pruning_targets(original: nn.Module, data: Any, n_samples: int | None = 256, layers: Sequence[str] | None = None,
                    seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The unpruned model's per-channel (mean, std) at the REPAIR layers: the targets of post-pruning
    REPAIR/RESCALE (Eq. 2 with the unpruned model as the only reference, weight 1).

    Measured on the same calibration samples :func:`repair_pruned` uses for the same ``data``,
    ``n_samples`` and ``seed``; compute them once and pass ``targets=`` to repair many pruned copies.
    """
    data, n_samples = _calibration(data, _check_n_samples(n_samples), seed)
    return normalize.target_stats([original], [1.0], data, layers=None if layers is None else list(layers),
                                  n_samples=n_samples)


def _calibration(data: Any, n_samples: int | None, seed: int) -> tuple[Any, int | None]:
    """A VisionData larger than ``n_samples`` becomes its stratified subset (then n_samples=None)."""
    if data is None:
        raise ValueError("post-pruning normalization needs calibration data (a few hundred training images), "
                         "got None")
    if isinstance(data, VisionData):
        if n_samples is not None and n_samples < len(data):
            data = calibration_subset(data, n_samples, seed=seed)
        return data, None
    return data, n_samples


def repair_pruned(pruned: nn.Module, original: nn.Module, data: Any, method: str = "repair",
                  n_samples: int | None = 256, layers: Sequence[str] | None = None, seed: int = 0, *,
                  targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  batch_size: int | None = None) -> nn.Module:
    """Post-pruning normalization (paper §5.5, Eq. 2 with the unpruned model as the only reference,
    weight 1): a normalized copy of ``pruned``.

    ``repair``: every channel of the REPAIR layers (:func:`vfnb.normalize.repair_layers`, or
    ``layers``) gets the mean and std that the unpruned ``original`` has there on ``data``;
    ``rescale``: only the std (no centering); ``reset``: re-estimate the BatchNorm statistics
    (RESET; needs BatchNorm layers). The corrections are folded into the existing layers (see
    :mod:`vfnb.normalize`), so the architecture is unchanged and zeroed weights stay zero.
    ``n_samples`` calibration samples serve both models (appendix A.7: a few hundred are enough);
    a larger VisionData is reduced to a class-stratified subset chosen with ``seed``, since the
    first images of a class-sorted set would all be one class. ``targets`` (from
    :func:`pruning_targets`) skips measuring the original again; ``batch_size`` streams large
    calibration sets through :mod:`vfnb.normalize` (None: one pass).
    """
    method = Fix.parse(method, REPAIR_METHODS, "post-pruning normalization")
    try:
        check_same_architecture(original, pruned)
    except ValueError as err:
        raise ValueError(f"the pruned model must be a pruned copy of the original: {err}") from None
    check_finite(pruned, "pruned")
    check_finite(original, "original")
    data, n_samples = _calibration(data, _check_n_samples(n_samples), seed)
    if method is Fix.RESET:
        if layers is not None or targets is not None:
            raise ValueError("reset re-estimates every BatchNorm layer from data alone; it takes no layers or targets")
        if not any(isinstance(m, BN_TYPES) for m in pruned.modules()):
            raise ValueError(f"reset needs BatchNorm layers and this {type(pruned).__name__} has none; "
                             "use method='repair' (or 'rescale') for models without BatchNorm")
        return normalize.reset_bn_stats(pruned, data, n_samples=n_samples, batch_size=batch_size)
    fn = normalize.repair if method is Fix.REPAIR else normalize.rescale
    layers = None if layers is None else list(layers)
    if targets is not None:
        return fn(pruned, data=data, layers=layers, targets=targets, n_samples=n_samples, batch_size=batch_size)
    return fn(pruned, [original], [1.0], data, layers=layers, n_samples=n_samples, batch_size=batch_size)
