"""Post-merging (and post-pruning) normalization: RESET, REPAIR, RESCALE and bias removal (paper §2
Eq. 2, §5.3, appendix A.3 Algorithms 1–2; ARCHITECTURE.md), and :class:`Fix`, the one vocabulary of
post-merge fixes. Bias calibration is an option of :func:`vfnb.merge.interpolate`.

Every function returns a new model unless ``inplace=True``; the architecture and the parameter count
never change: REPAIR and RESCALE fold their per-channel affine correction into the conv/linear layer
(or into the affine of the norm that follows it).

*Layers* are conv/linear modules, named as in ``model.named_modules()``. A layer's *pre-activation
output* is the output of the norm that directly follows it if there is one
(:attr:`vfnb.structure.Structure.point`), else the layer's own output. Channel statistics are taken per
output channel (axis 1 of a conv map, the last axis of a linear output) over every other axis,
per batch in float32 (Welford) and combined across batches in float64; "std" is the population
standard deviation.

*Data* arguments are read by :mod:`vfnb.activations`; ``n_samples`` keeps a class-stratified subset of
that many images of a VisionData, or the first that many inputs of a tensor or batch iterable
(``None``: all).
"""
from __future__ import annotations

import copy
import enum
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .activations import batch_moments, chunks, inputs, merge_moments, to_model
from .graph import Permutation
from .structure import BN_TYPES, Structure, conv_linear_layers, repair_layers, structure_of
from .validate import check_finite, check_module, check_same_architecture

__all__ = ["Fix", "layer_stats", "target_stats", "weighted_stats", "permute_stats", "repair", "rescale", "corrections",
           "folded_parameters",
           "reset_bn_stats", "remove_bias", "conv_linear_layers", "repair_layers", "Stats"]

#: ``{layer: (mean[C], std[C])}`` in float64 on the CPU.
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]

#: A channel whose std is at most ``EPS·(|mean| + target std)`` carries no input signal at float32
#: resolution (round-off is ~6e-8 relative): its scale is left unchanged instead of amplifying noise.
EPS = 1e-6


class Fix(str, enum.Enum):
    """The post-merge (and post-pruning) fixes of the paper, with their display labels.

    ``NONE`` merges without a fix; ``REPAIR`` and ``RESCALE`` (Eq. 2, §5.3) renormalize
    pre-activations to the edge models' statistics; ``RESET`` re-estimates BatchNorm statistics
    (appendix Alg. 1); ``BIAS_REMOVAL`` zeroes the last k biases and ``BIAS_CALIBRATION`` scales the
    bias of layer l by (1−α)^l, α^l (§5.3). One vocabulary for PFM, pruning and every chapter.
    """
    NONE = "none"
    REPAIR = "repair"
    RESCALE = "rescale"
    RESET = "reset"
    BIAS_REMOVAL = "bias_removal"
    BIAS_CALIBRATION = "bias_calibration"

    @property
    def label(self) -> str:
        """How tables and legends name the fix."""
        return _LABELS[self]

    @property
    def needs_data(self) -> bool:
        """Whether the fix measures statistics on calibration data."""
        return self in (Fix.REPAIR, Fix.RESCALE, Fix.RESET)

    @classmethod
    def parse(cls, value: Fix | str | None, allowed: Sequence[Fix] | None = None, what: str = "fix") -> Fix:
        """``value`` as a :class:`Fix` (None and "none" are ``NONE``; labels are accepted too), or a
        ``ValueError`` naming the choices (``allowed``, default: every fix)."""
        choices = list(cls) if allowed is None else list(allowed)
        fix = None
        if value is None:
            fix = cls.NONE
        elif isinstance(value, cls):
            fix = value
        elif isinstance(value, str):
            key = value.strip().lower().replace(" ", "_").replace("-", "_")
            fix = next((f for f in cls if key in (f.value, f.label.lower().replace(" ", "_"))), None)
        if fix is None or fix not in choices:
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(repr(f.value) for f in choices)}")
        return fix

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:  # equal to its value, so dict keys may be given as the string too
        return hash(self.value)


_LABELS = {Fix.NONE: "no normalization", Fix.REPAIR: "REPAIR", Fix.RESCALE: "RESCALE", Fix.RESET: "RESET",
           Fix.BIAS_REMOVAL: "bias removal", Fix.BIAS_CALIBRATION: "bias calibration"}


# ---------------------------------------------------------------------------------------------------
# statistics
def _channel_axis(layer: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(layer, nn.Linear) else 1


class _Stop(Exception):
    pass


@torch.no_grad()
def _collect(model: nn.Module, s: Structure, layers: list[str], x: torch.Tensor, batch_size: int | None,
             stop_after: str | None = None) -> Stats:
    modules = dict(model.named_modules())
    acc: dict[str, Any] = {n: None for n in layers}

    def hook(name: str):
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            acc[name] = merge_moments(acc[name], batch_moments(out, _channel_axis(modules[name], out)))
            if name == stop_after:
                raise _Stop
        return fn

    hooks = [modules[s.point[n]].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    try:
        model.eval()
        for xb in chunks(x, batch_size):
            try:
                model(to_model(xb, model))
            except _Stop:
                pass
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = {}
    for n, m in acc.items():
        if m is None:
            raise RuntimeError(f"layer {n!r} was never executed by a forward pass")
        out[n] = (m[1].cpu(), m[2].clamp_min(0).sqrt().cpu())
    return out


def layer_stats(model: nn.Module, data: Any, layers: Sequence[str] | None = None, n_samples: int | None = None,
                batch_size: int = 500) -> Stats:
    """Per-channel (mean, std) of each layer's pre-activation output on ``data`` (the statistics of
    Eq. 2), as ``{layer: (mean, std)}`` float64 CPU tensors. ``layers`` defaults to :func:`repair_layers`."""
    check_finite(model)
    x = inputs(data, n_samples)
    s = structure_of(model)
    layers = s.check_layers(layers, s.repair_layers(type(model).__name__))
    return _collect(model, s, layers, x, batch_size)


def target_stats(references: Sequence[nn.Module], weights: Sequence[float], data: Any,
                 layers: Sequence[str] | None = None, n_samples: int | None = None) -> Stats:
    """Eq. 2's targets: (Σ_i w_i·mean_i, Σ_i w_i·std_i) per channel over the reference models, e.g.
    ``([edge0, permuted edge1], [1−α, α])`` after merging or ``([unpruned], [1.0])`` after pruning.

    Reference statistics cost one pass per reference; for many α, measure each reference once with
    :func:`layer_stats` and combine them per α with :func:`weighted_stats`."""
    if isinstance(references, nn.Module):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("target_stats needs at least one reference model")
    w = _check_weights(weights, len(references))
    for i, r in enumerate(references):
        check_same_architecture(references[0], r)
        check_finite(r, f"reference {i}")
    x = inputs(data, n_samples)
    s = structure_of(references[0])
    layers = s.check_layers(layers, s.repair_layers(type(references[0]).__name__))
    return weighted_stats([_collect(r, s, layers, x, 500) for r in references], w)


def weighted_stats(stats: Sequence[Stats], weights: Sequence[float]) -> Stats:
    """Eq. 2's targets from per-reference :func:`layer_stats` measured once: (Σ w_i·mean_i, Σ w_i·std_i) per
    layer. With ``stats = [layer_stats(edge0, d), layer_stats(permuted_edge1, d)]``, each α of a sweep costs
    no pass over the data: ``repair(merged_α, data=d, targets=weighted_stats(stats, [1 - α, α]))``."""
    stats = list(stats)
    if not stats:
        raise ValueError("weighted_stats needs the statistics of at least one reference")
    w = _check_weights(weights, len(stats))
    layers = list(stats[0])
    for st in stats[1:]:
        if list(st) != layers or any(st[n][0].shape != stats[0][n][0].shape for n in layers):
            raise ValueError("the references' statistics cover different layers or channel counts; measure them "
                             "with layer_stats on models of one architecture and the same layers")
    return {n: (sum(wi * st[n][0] for wi, st in zip(w, stats)), sum(wi * st[n][1] for wi, st in zip(w, stats)))
            for n in layers}


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [weights] if isinstance(weights, (int, float)) else list(weights)
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} reference model(s); pass one weight per reference, "
                         "e.g. [1 - alpha, alpha] for two edge models")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in w):
        raise ValueError(f"weights must be finite numbers >= 0, got {w}")
    if sum(w) <= 0:
        raise ValueError(f"weights must not all be zero, got {w}")
    return [float(v) for v in w]


# ---------------------------------------------------------------------------------------------------
# REPAIR / RESCALE
def _affine(stats_mean: torch.Tensor, stats_std: torch.Tensor, t_mean: torch.Tensor, t_std: torch.Tensor,
            shift: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, offset, degenerate count) such that ``scale·y + offset`` has the target statistics."""
    degenerate = stats_std <= EPS * (stats_mean.abs() + t_std) + 1e-30
    scale = torch.where(degenerate, torch.ones_like(stats_std), t_std / stats_std.clamp_min(1e-300))
    offset = t_mean - scale * stats_mean if shift else torch.zeros_like(scale)
    return scale, offset, int(degenerate.sum())


def folded_parameters(model: nn.Module, corrections: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      structure: Structure | None = None,
                      params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The parameters that change when each layer's pre-activation ``y`` becomes ``scale·y + offset``
    (``corrections = {layer: (scale, offset)}``, as :func:`corrections` returns them), as new tensors keyed
    like ``model.state_dict()``; the model is left untouched. The correction goes into the layer's weight and
    bias, or into the affine of the norm after it (:attr:`vfnb.structure.Structure.point`). REPAIR folds its
    correction this way; TACT (:func:`vfnb.tact`) folds one task's corrections per forward pass. ``params``
    (``{name: tensor}``) replaces the model's own values of those parameters before folding."""
    s = structure or structure_of(model)
    modules = dict(model.named_modules())
    params = params or {}
    out: dict[str, torch.Tensor] = {}
    for layer, (scale, offset) in corrections.items():
        name = s.point[layer]
        point = modules[name]
        w, b = point.weight, point.bias
        w = params.get(f"{name}.weight", w) if w is not None else None
        b = params.get(f"{name}.bias", b) if b is not None else None
        if point is modules[layer]:
            if b is None and bool((offset != 0).any()):
                raise ValueError(f"layer {layer!r} has no bias and no norm after it, so REPAIR's shift cannot be folded "
                                 "without adding parameters; use rescale(), or build the model with biases")
            out[f"{name}.weight"] = w * scale.to(w).view((-1,) + (1,) * (w.dim() - 1))
        else:
            if w is None or b is None:
                raise ValueError(f"norm {name!r} after layer {layer!r} has no affine parameters to fold "
                                 "REPAIR/RESCALE into; build it with affine=True")
            if w.shape != scale.shape:
                raise ValueError(f"norm {name!r} has affine parameters of shape {tuple(w.shape)}, not one per "
                                 f"channel ({len(scale)}); REPAIR/RESCALE cannot be folded into it")
            out[f"{name}.weight"] = w * scale.to(w)
        if b is not None:
            out[f"{name}.bias"] = b * scale.to(b) + offset.to(b)
    return out


@torch.no_grad()
def _fold(model: nn.Module, s: Structure, layer: str, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """Replace the pre-activation ``y`` of ``layer`` by ``scale·y + offset`` inside its parameters."""
    params = dict(model.named_parameters())
    for name, value in folded_parameters(model, {layer: (scale, offset)}, s).items():
        params[name].copy_(value)


def _normalize(model: nn.Module, references: Sequence[nn.Module] | nn.Module | None, weights: Any, data: Any,
               layers: Sequence[str] | None, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
               n_samples: int | None, inplace: bool, batch_size: int | None, shift: bool, what: str) -> nn.Module:
    check_finite(model)
    if data is None:
        raise ValueError(f"{what} needs data: the calibration inputs on which channel statistics are measured")
    if (targets is None) == (references is None):
        raise ValueError(f"{what}: pass either references (with weights) or targets (from target_stats), not "
                         f"{'both' if targets is not None else 'neither'}")
    x = inputs(data, n_samples)
    s = structure_of(model)
    if targets is None:
        refs = [references] if isinstance(references, nn.Module) else list(references)
        if not refs:
            raise ValueError(f"{what} needs at least one reference model")
        for i, r in enumerate(refs):
            check_same_architecture(model, r)
            check_finite(r, f"reference {i}")
        layers = s.check_layers(layers, s.repair_layers(type(model).__name__))
        targets = target_stats(refs, weights, x, layers)
    else:
        if not isinstance(targets, Mapping):
            raise TypeError(f"targets must be a dict {{layer: (mean, std)}} from target_stats, got "
                            f"{type(targets).__name__}")
        order = [n for n in s.all_layers if n in targets]
        layers = s.check_layers(layers, order)
        missing = [n for n in layers if n not in targets]
        if missing:
            raise ValueError(f"targets have no statistics for layer(s) {missing}; compute them with target_stats "
                             "for these layers")
    _check_targets(model, layers, targets)
    out = model if inplace else copy.deepcopy(model)
    if batch_size is None or batch_size >= len(x):
        # one pass over all inputs at once (exact: each layer is measured with the earlier corrections in place)
        found, degenerate, total = _one_pass(out, s, layers, targets, x, shift)
        for n in layers:
            _fold(out, s, n, *found[n])
    else:
        # streaming: one (truncated) pass per layer, in execution order
        degenerate, total = 0, 0
        for n in layers:
            mean, std = _collect(out, s, [n], x, batch_size, stop_after=n)[n]
            tm, ts = (t.double().cpu() for t in targets[n])
            scale, offset, deg = _affine(mean, std, tm, ts, shift)
            degenerate, total = degenerate + deg, total + len(scale)
            _fold(out, s, n, scale, offset)
    _warn_degenerate(what, degenerate, total, shift)
    return out


def _warn_degenerate(what: str, degenerate: int, total: int, shift: bool, stacklevel: int = 4) -> None:
    if degenerate:
        warnings.warn(f"{what}: {degenerate} of {total} channels have (near-)zero variance on the data (std <= "
                      f"{EPS:g}·(|mean| + target std)); their scale was left unchanged"
                      + (" and only their mean was set" if shift else ""), RuntimeWarning, stacklevel=stacklevel)


def _one_pass(model: nn.Module, s: Structure, layers: Sequence[str], targets: Mapping[str, Any], x: torch.Tensor,
              shift: bool) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, int]:
    """Each chosen pre-activation corrected on the fly in one forward pass over ``x``, so every later layer is
    measured with the earlier corrections in place; returns ``{layer: (scale, offset)}`` (CPU) and the
    degenerate-channel counts. The model's parameters are not changed."""
    affines: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(model.named_modules())
    degenerate = total = 0

    def hook(name: str):
        def fn(mod: nn.Module, inp: Any, y: torch.Tensor) -> torch.Tensor:
            nonlocal degenerate, total
            axis = _channel_axis(modules[name], y)
            _, mean, var = batch_moments(y, axis)
            std = var.clamp_min(0).sqrt()
            tm, ts = (t.to(mean) for t in targets[name])
            scale, offset, deg = _affine(mean, std, tm, ts, shift)
            degenerate += deg
            total += len(scale)
            affines[name] = (scale, offset)
            shape = [1] * y.dim()
            shape[axis] = -1
            return torch.addcmul(offset.to(y.dtype).view(shape), y, scale.to(y.dtype).view(shape))
        return fn

    hooks = [modules[s.point[n]].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(to_model(x, model))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: tuple(t.cpu() for t in affines[n]) for n in layers}, degenerate, total


def corrections(model: nn.Module, data: Any, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                shift: bool = True, layers: Sequence[str] | None = None,
                n_samples: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eq. 2's per-channel affine corrections without folding them: ``{layer: (scale, offset)}`` such that
    ``scale·y + offset`` gives each chosen pre-activation ``y`` of ``model`` the target (mean, std) on ``data``,
    every layer measured with the earlier layers already corrected (one exact pass). ``shift=False`` is
    RESCALE's (offset 0). :func:`repair` is this followed by :func:`folded_parameters`; TACT keeps one such set
    per task. ``layers`` defaults to the targets' layers."""
    check_finite(model)
    if not isinstance(targets, Mapping):
        raise TypeError(f"targets must be a dict {{layer: (mean, std)}} from layer_stats/target_stats, got "
                        f"{type(targets).__name__}")
    s = structure_of(model)
    layers = s.check_layers(layers, [n for n in s.all_layers if n in targets])
    _check_targets(model, layers, targets)
    found, degenerate, total = _one_pass(model, s, layers, targets, inputs(data, n_samples), shift)
    _warn_degenerate("corrections", degenerate, total, shift, stacklevel=3)
    return found


def _check_targets(model: nn.Module, layers: Sequence[str], targets: Mapping[str, Any]) -> None:
    modules = dict(model.named_modules())
    for n in layers:
        if n not in targets:
            raise ValueError(f"targets have no statistics for layer {n!r}; compute them with layer_stats/target_stats "
                             "for this layer")
        mean, std = targets[n]
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"targets for {n!r} are not finite; they were measured on a model with NaN/inf outputs")
        channels = modules[n].weight.shape[0]
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"targets for {n!r} have shapes {tuple(mean.shape)}/{tuple(std.shape)}, but the layer has "
                             f"{channels} channels: targets from another architecture?")


def repair(model: nn.Module, references: Sequence[nn.Module] | nn.Module | None = None,
           weights: Sequence[float] | None = None, data: Any = None, layers: Sequence[str] | None = None, *,
           targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, n_samples: int | None = None,
           inplace: bool = False, batch_size: int | None = None) -> nn.Module:
    """REPAIR (paper Eq. 2, appendix Alg. 2): every chosen channel's pre-activation becomes
    ``(y − mean_model)/std_model · std_target + mean_target``, measured on ``data``, and the correction
    is folded into the layer (or the norm after it), so the architecture and parameter count stay.

    Targets come from ``references`` weighted by ``weights`` (default: equal), or precomputed ``targets``
    (:func:`target_stats`). ``layers`` defaults to :func:`repair_layers` (or the targets' layers).
    ``batch_size=None`` measures all inputs in one pass (exact: each layer sees the corrected layers
    before it); a smaller ``batch_size`` streams the data with one truncated pass per layer.
    """
    return _normalize(model, references, weights, data, layers, targets, n_samples, inplace, batch_size,
                      shift=True, what="REPAIR")


def rescale(model: nn.Module, references: Sequence[nn.Module] | nn.Module | None = None,
            weights: Sequence[float] | None = None, data: Any = None, layers: Sequence[str] | None = None, *,
            targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, n_samples: int | None = None,
            inplace: bool = False, batch_size: int | None = None) -> nn.Module:
    """RESCALE (paper §5.3): like :func:`repair` but scaling only, ``y / std_model · std_target`` with no
    centering and no target mean (the input-independent offset is not re-introduced)."""
    return _normalize(model, references, weights, data, layers, targets, n_samples, inplace, batch_size,
                      shift=False, what="RESCALE")


# ---------------------------------------------------------------------------------------------------
# RESET
@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Any, n_samples: int | None = None, inplace: bool = False,
                   batch_size: int | None = None, part: nn.Module | str | None = None) -> nn.Module:
    """RESET (appendix Alg. 1): re-estimate BatchNorm running means and variances on ``data``: statistics
    reset, momentum=None (a cumulative average over batches), no gradients, forward passes of the whole
    model with only those BatchNorms in train mode; the model is returned in eval mode.

    ``part`` restricts RESET to the BatchNorms inside one submodule (or its name), e.g. the merged tail of
    a PFM model, whose stems keep the edge models' statistics; a part without BatchNorm is left as it is.
    ``batch_size=None`` feeds all inputs as one batch.
    """
    check_module(model)
    check_finite(model)
    if part is not None:
        if isinstance(part, str):
            try:
                part = model.get_submodule(part)
            except AttributeError:
                raise ValueError(f"model has no submodule {part!r} to RESET") from None
        elif not any(m is part for m in model.modules()):
            raise ValueError("part must be a submodule of model (or its name)")
    scope = model if part is None else part
    bns = [m for m in scope.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        if part is not None:
            return model if inplace else copy.deepcopy(model)  # nothing merged carries BatchNorm
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers, so RESET has nothing to re-estimate; "
                         "use repair() to renormalize a model without BatchNorm")
    if any(not m.track_running_stats for m in bns):
        raise ValueError("a BatchNorm layer does not track running statistics (track_running_stats=False)")
    x = inputs(data, n_samples)
    out = model if inplace else copy.deepcopy(model)
    if not inplace:  # the same BatchNorms in the copy
        index = {id(m): i for i, m in enumerate(model.modules())}
        copies = list(out.modules())
        bns = [copies[index[id(m)]] for m in bns]
    momenta = [m.momentum for m in bns]
    out.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for xb in chunks(x, batch_size):
            out(to_model(xb, out))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        out.eval()
    return out


# ---------------------------------------------------------------------------------------------------
# bias removal
def remove_bias(model: nn.Module, *, last: int | None = None, first: int | None = None, inplace: bool = False,
                example_input: torch.Tensor | None = None) -> nn.Module:
    """Bias removal (paper §5.3): zero the biases of the last ``last`` ("backward") or the first ``first``
    ("forward") of the L conv/linear layers of :func:`conv_linear_layers`."""
    if (last is None) == (first is None):
        raise ValueError("remove_bias: pass exactly one of last=k (the last k layers) or first=k (the first k)")
    k = last if last is not None else first
    check_finite(model)
    layers = conv_linear_layers(model, example_input)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(layers):
        raise ValueError(f"the number of layers must be an integer in [0, {len(layers)}] (this model has "
                         f"{len(layers)} conv/linear layers), got {k!r}")
    chosen = layers[len(layers) - k:] if last is not None else layers[:k]
    out = model if inplace else copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for n in chosen:
            if modules[n].bias is not None:
                modules[n].bias.zero_()
    if chosen and all(modules[n].bias is None for n in chosen):
        warnings.warn(f"none of the layers {chosen} has a bias; remove_bias changed nothing", RuntimeWarning,
                      stacklevel=2)
    return out


def permute_stats(stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]], perm: Permutation) -> Stats:
    """The channel statistics of ``apply_permutation(model, perm)`` from those of ``model`` (no data pass):
    each layer's (mean, std) reindexed by the permutation of its output channels."""
    if not isinstance(perm, Permutation):
        raise TypeError(f"perm must be a Permutation, got {type(perm).__name__}")
    out = {}
    for n, (m, s) in stats.items():
        g = perm.spec.group_of(f"{n}.weight", 0)
        out[n] = (m, s) if g is None else (m[perm[g.index]], s[perm[g.index]])
    return out
