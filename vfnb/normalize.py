"""Post-merging (and post-pruning) normalization: RESET, REPAIR, RESCALE, bias removal and bias
calibration (paper §2 Eq. 2, §5.3, appendix A.3 Algorithms 1–2; DESIGN.md "The paper").

Every function returns a new model unless ``inplace=True``; the architecture and the parameter count
never change: REPAIR and RESCALE fold their per-channel affine correction into the conv/linear layer
(or into the affine of the norm that follows it).

*Layers* are conv/linear modules, named as in ``model.named_modules()``. A layer's *pre-activation
output* is the output of the norm that directly follows it if there is one (BatchNorm, LayerNorm,
:class:`~vfnb.models.LayerNorm2d`), else the layer's own output. Channel statistics are taken per
output channel (axis 1 of a conv map, the last axis of a linear output) over every other axis,
per batch in float32 (Welford) and combined across batches in float64; "std" is the population
standard deviation.

*Data* arguments accept a :class:`~vfnb.data.VisionData` (its normalized images, no augmentation), a
tensor of inputs, or an iterable of ``x`` or ``(x, y)`` batches; ``n_samples`` keeps the first that
many inputs (``None``: all).
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .data import VisionData, calibration_subset
from .graph import UnsupportedOperationError, _depths, _Tracer  # the permutation engine's fx tracer and layer count
from .merge import check_alpha, check_same_architecture
from .models import device_of
from .models.norm import LayerNorm2d

__all__ = ["conv_linear_layers", "repair_layers", "layer_stats", "target_stats", "weighted_stats", "repair", "rescale",
           "reset_bn_stats", "remove_bias", "calibrate_bias", "Stats"]

#: ``{layer: (mean[C], std[C])}`` in float64 on the CPU.
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]

WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, LayerNorm2d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: A channel whose std is at most ``EPS·(|mean| + target std)`` carries no input signal at float32
#: resolution (round-off is ~6e-8 relative): its scale is left unchanged instead of amplifying noise.
EPS = 1e-6


# ---------------------------------------------------------------------------------------------------
# inputs
def _inputs(data: Any, n_samples: int | None = None) -> torch.Tensor:
    """All inputs of ``data`` as one float tensor on the CPU; with ``n_samples``, a class-stratified
    subset of a VisionData (its images may be sorted by class, so "the first n" could be one digit),
    or the first ``n_samples`` of a tensor or batch iterable."""
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be an integer >= 1 or None (all of the data), got {n_samples!r}")
    if data is None:
        raise ValueError("no data given: pass a VisionData, a tensor of inputs, or an iterable of (x, y) batches")
    if isinstance(data, torch.Tensor):
        xs = [data]
    elif hasattr(data, "batches"):
        if isinstance(data, VisionData) and n_samples is not None and n_samples < len(data):
            data = calibration_subset(data, n_samples)
        xs = []
        seen = 0
        for x, _ in data.batches(500, augment=False):
            xs.append(x)
            seen += len(x)
            if n_samples is not None and seen >= n_samples:
                break
    elif isinstance(data, Iterable):
        xs, seen = [], 0
        for b in data:
            x = b[0] if isinstance(b, (tuple, list)) else b
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"data batches must be tensors or (x, y) tuples, got {type(x).__name__}")
            xs.append(x)
            seen += len(x)
            if n_samples is not None and seen >= n_samples:
                break
    else:
        raise TypeError(f"data must be a VisionData, a tensor or an iterable of batches, got {type(data).__name__}")
    if not xs:
        raise ValueError("data is empty; statistics need at least 2 inputs")
    x = torch.cat([t.detach().cpu() for t in xs]).float()
    if n_samples is not None:
        x = x[:n_samples]
    if len(x) < 2:
        raise ValueError(f"statistics need at least 2 inputs, got {len(x)}")
    return x


def _chunks(x: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
    if batch_size is None:
        return [x]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or None (all inputs at once), got {batch_size!r}")
    return list(torch.split(x, batch_size))


# ---------------------------------------------------------------------------------------------------
# structure
@dataclass(frozen=True)
class _Structure:
    layers: tuple[str, ...]          # the paper's L layers, in order (shortcut convs excluded)
    all_layers: tuple[str, ...]      # every conv/linear, in graph order
    point: dict[str, str]            # layer -> module whose output is its pre-activation
    residual: bool                   # the graph adds two tensors (residual connections) or has shortcut layers


def _structure(model: nn.Module, example_input: torch.Tensor | None) -> _Structure:
    """Trace ``model`` with torch.fx (no forward pass is needed: only the graph's wiring matters)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    try:
        graph = _Tracer().trace(model)  # no stack traces recorded: 20× faster than graph._trace
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear error
        raise UnsupportedOperationError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. Normalization needs the "
            "layer structure, i.e. a forward without data-dependent control flow") from err
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), WEIGHT_TYPES):
            calls.setdefault(str(node.target), []).append(node)
    if not calls:
        raise ValueError(f"{type(model).__name__} has no conv or linear layers")
    shared = [n for n, nodes in calls.items() if len(nodes) > 1]
    if shared:
        raise ValueError(f"layer(s) {shared} are called more than once per forward pass; their pre-activations "
                         "cannot be normalized separately")
    point = {}
    for name, (node,) in calls.items():
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        is_norm = nxt is not None and nxt.op == "call_module" and isinstance(modules.get(str(nxt.target)), NORM_TYPES)
        point[name] = str(nxt.target) if is_norm else name
    nodes = [n for (n,) in calls.values()]
    lp, main, _ = _depths(graph, set(nodes))
    order = list(graph.nodes)
    layers = tuple(str(n.target) for n in sorted(main, key=lambda n: (lp[n], order.index(n))))
    residual = len(main) < len(nodes) or any(
        n.op in ("call_function", "call_method") and n.target in _ADDS
        and sum(isinstance(a, fx.Node) for a in n.args) >= 2 for n in order)
    return _Structure(layers, tuple(str(n.target) for n in nodes), point, residual)


_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")


def conv_linear_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """The paper's L layers: conv/linear module names in execution order, without ResNet shortcut convs
    (VGG16: 14, ResNet20: 20). Layer l of bias calibration and PFM is element l−1 of this list.

    The structure comes from the model's torch.fx graph (layers on a longest input→output path), so
    ``example_input`` is optional and only checked to be a tensor."""
    layers = list(_structure(model, example_input).layers)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no conv or linear layers")
    return layers


def repair_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """REPAIR/RESCALE's default layers (paper appendix A.3): every conv/linear except the classifier for
    chain networks (VGG, MLP); for residual networks (ResNet) the convs inside the residual blocks, i.e.
    the L layers without the stem and the classifier."""
    return _repair_layers(_structure(model, example_input), type(model).__name__)


def _repair_layers(s: _Structure, what: str = "the model") -> list[str]:
    layers = list(s.layers[1:-1] if s.residual else s.layers[:-1])
    if not layers:
        raise ValueError(f"{what} has {len(s.layers)} conv/linear layer(s); REPAIR needs a hidden layer before "
                         "the classifier")
    return layers


def _check_layers(s: _Structure, layers: Sequence[str] | None, default: list[str]) -> list[str]:
    if layers is None:
        return default
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; pass None for the default layers")
    bad = [n for n in layers if n not in s.point]
    if bad:
        raise ValueError(f"{bad} are not conv/linear layers of this model; choose among {list(s.all_layers)}")
    order = {n: i for i, n in enumerate(s.all_layers)}
    return sorted(dict.fromkeys(layers), key=order.__getitem__)


# ---------------------------------------------------------------------------------------------------
# statistics
def _channel_axis(layer: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(layer, nn.Linear) else 1


def _batch_moments(y: torch.Tensor, axis: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel (count, mean, population variance) of one batch: Welford in float32, returned in float64."""
    var, mean = torch.var_mean(y.detach(), dim=[d for d in range(y.dim()) if d != axis], correction=0)
    return y.numel() // y.shape[axis], mean.double(), var.double()


def _merge_moments(a: tuple[int, torch.Tensor, torch.Tensor] | None,
                   b: tuple[int, torch.Tensor, torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Combine two (count, mean, variance) summaries exactly (Chan et al.'s parallel update)."""
    if a is None:
        return b
    na, ma, va = a
    nb, mb, vb = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), (va * na + vb * nb + delta * delta * (na * nb / n)) / n


class _Stop(Exception):
    pass


@torch.no_grad()
def _collect(model: nn.Module, s: _Structure, layers: list[str], x: torch.Tensor, batch_size: int | None,
             stop_after: str | None = None) -> Stats:
    modules = dict(model.named_modules())
    acc: dict[str, Any] = {n: None for n in layers}

    def hook(name: str):
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            acc[name] = _merge_moments(acc[name], _batch_moments(out, _channel_axis(modules[name], out)))
            if name == stop_after:
                raise _Stop
        return fn

    hooks = [modules[s.point[n]].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    device = device_of(model)
    try:
        model.eval()
        for xb in _chunks(x, batch_size):
            try:
                model(xb.to(device))
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
    x = _inputs(data, n_samples)
    s = _structure(model, x[:1])
    layers = _check_layers(s, layers, _repair_layers(s) if layers is None else [])
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
    for r in references[1:]:
        check_same_architecture(references[0], r)
    x = _inputs(data, n_samples)
    s = _structure(references[0], x[:1])
    layers = _check_layers(s, layers, _repair_layers(s) if layers is None else [])
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


@torch.no_grad()
def _fold(model: nn.Module, s: _Structure, layer: str, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """Replace the pre-activation ``y`` of ``layer`` by ``scale·y + offset`` inside its parameters."""
    modules = dict(model.named_modules())
    point = modules[s.point[layer]]
    if point is modules[layer]:
        w, b = point.weight, point.bias
        if b is None and bool((offset != 0).any()):
            raise ValueError(f"layer {layer!r} has no bias and no norm after it, so REPAIR's shift cannot be folded "
                             "without adding parameters; use rescale(), or build the model with biases")
        shape = (-1,) + (1,) * (w.dim() - 1)
        w.mul_(scale.to(w).view(shape))
    else:
        w, b = point.weight, point.bias
        if w is None or b is None:
            raise ValueError(f"norm {s.point[layer]!r} after layer {layer!r} has no affine parameters to fold "
                             "REPAIR/RESCALE into; build it with affine=True")
        if w.shape != scale.shape:
            raise ValueError(f"norm {s.point[layer]!r} has affine parameters of shape {tuple(w.shape)}, not one per "
                             f"channel ({len(scale)}); REPAIR/RESCALE cannot be folded into it")
        w.mul_(scale.to(w))
    if b is not None:
        b.mul_(scale.to(b)).add_(offset.to(b))


def _normalize(model: nn.Module, references: Sequence[nn.Module] | nn.Module | None, weights: Any, data: Any,
               layers: Sequence[str] | None, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
               n_samples: int | None, inplace: bool, batch_size: int | None, shift: bool, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if data is None:
        raise ValueError(f"{what} needs data: the calibration inputs on which channel statistics are measured")
    if (targets is None) == (references is None):
        raise ValueError(f"{what}: pass either references (with weights) or targets (from target_stats), not "
                         f"{'both' if targets is not None else 'neither'}")
    x = _inputs(data, n_samples)
    s = _structure(model, x[:1])
    if targets is None:
        refs = [references] if isinstance(references, nn.Module) else list(references)
        if not refs:
            raise ValueError(f"{what} needs at least one reference model")
        for r in refs:
            check_same_architecture(model, r)
        layers = _check_layers(s, layers, _repair_layers(s) if layers is None else [])
        targets = target_stats(refs, weights, x, layers)
    else:
        if not isinstance(targets, Mapping):
            raise TypeError(f"targets must be a dict {{layer: (mean, std)}} from target_stats, got "
                            f"{type(targets).__name__}")
        order = [n for n in s.all_layers if n in targets]
        layers = _check_layers(s, layers, order if layers is None else [])
        missing = [n for n in layers if n not in targets]
        if missing:
            raise ValueError(f"targets have no statistics for layer(s) {missing}; compute them with target_stats "
                             "for these layers")
    modules = dict(model.named_modules())
    for n in layers:
        mean, std = targets[n]
        channels = modules[n].weight.shape[0]
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"targets for {n!r} have shapes {tuple(mean.shape)}/{tuple(std.shape)}, but the layer has "
                             f"{channels} channels: targets from another architecture?")
    out = model if inplace else copy.deepcopy(model)
    degenerate, total = 0, 0
    if batch_size is None or batch_size >= len(x):
        # one pass over all inputs at once: each chosen pre-activation is corrected on the fly, so every later
        # layer is measured with the earlier corrections in place (exact), then the corrections are folded
        affines: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        omods = dict(out.named_modules())

        def hook(name: str):
            def fn(mod: nn.Module, inp: Any, y: torch.Tensor) -> torch.Tensor:
                nonlocal degenerate, total
                axis = _channel_axis(omods[name], y)
                _, mean, var = _batch_moments(y, axis)
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

        hooks = [omods[s.point[n]].register_forward_hook(hook(n)) for n in layers]
        was_training = out.training
        try:
            with torch.no_grad():
                out.eval()(x.to(device_of(out)))
        finally:
            out.train(was_training)
            for h in hooks:
                h.remove()
        for n in layers:
            _fold(out, s, n, *(t.cpu() for t in affines[n]))
    else:
        # streaming: one (truncated) pass per layer, in execution order
        for n in layers:
            mean, std = _collect(out, s, [n], x, batch_size, stop_after=n)[n]
            tm, ts = (t.double().cpu() for t in targets[n])
            scale, offset, deg = _affine(mean, std, tm, ts, shift)
            degenerate, total = degenerate + deg, total + len(scale)
            _fold(out, s, n, scale, offset)
    if degenerate:
        warnings.warn(f"{what}: {degenerate} of {total} channels have (near-)zero variance on the data (std <= "
                      f"{EPS:g}·(|mean| + target std)); their scale was left unchanged"
                      + (" and only their mean was set" if shift else ""), RuntimeWarning, stacklevel=3)
    return out


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
                   batch_size: int | None = None) -> nn.Module:
    """RESET (appendix Alg. 1): re-estimate every BatchNorm's running mean and variance on ``data``:
    statistics reset, momentum=None (a cumulative average over batches), train mode, no gradients;
    the model is returned in eval mode. ``batch_size=None`` feeds all inputs as one batch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers, so RESET has nothing to re-estimate; "
                         "use repair() to renormalize a model without BatchNorm")
    if any(not m.track_running_stats for m in bns):
        raise ValueError("a BatchNorm layer does not track running statistics (track_running_stats=False)")
    x = _inputs(data, n_samples)
    out = model if inplace else copy.deepcopy(model)
    bns = [m for m in out.modules() if isinstance(m, BN_TYPES)]
    momenta = [m.momentum for m in bns]
    device = device_of(out)
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        out.train()
        for xb in _chunks(x, batch_size):
            out(xb.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        out.eval()
    return out


# ---------------------------------------------------------------------------------------------------
# bias removal and calibration
def remove_bias(model: nn.Module, *, last: int | None = None, first: int | None = None, inplace: bool = False,
                example_input: torch.Tensor | None = None) -> nn.Module:
    """Bias removal (paper §5.3): zero the biases of the last ``last`` ("backward") or the first ``first``
    ("forward") of the L conv/linear layers of :func:`conv_linear_layers`."""
    if (last is None) == (first is None):
        raise ValueError("remove_bias: pass exactly one of last=k (the last k layers) or first=k (the first k)")
    k = last if last is not None else first
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


@torch.no_grad()
def calibrate_bias(model_a: nn.Module, model_b: nn.Module, alpha: float,
                   example_input: torch.Tensor | None = None) -> nn.Module:
    """Bias calibration (paper §5.3): weights and every other parameter interpolate linearly,
    (1−α)·θ_a + α·θ_b, while the bias of layer l (1-based, :func:`conv_linear_layers`) becomes
    (1−α)^l·b_a + α^l·b_b, matching the scale of the product of l interpolated weights.
    ``model_b`` must already be aligned to ``model_a``. BatchNorm models are refused."""
    alpha = check_alpha(alpha)
    check_same_architecture(model_a, model_b)
    if any(isinstance(m, BN_TYPES) for m in model_a.modules()):
        raise ValueError("calibrate_bias refuses models with BatchNorm: their running statistics belong to the "
                         "un-calibrated layers, so after rescaling the biases they would be meaningless (and BN "
                         "re-centres each channel anyway); use reset_bn_stats (RESET) for BatchNorm models")
    layers = conv_linear_layers(model_a, example_input)
    merged = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    state = {k: torch.lerp(v, sb[k].to(v), alpha) if v.is_floating_point() else v.clone()
             for k, v in model_a.state_dict().items()}
    for l, n in enumerate(layers, start=1):
        key = f"{n}.bias"
        if key in state:
            state[key] = (1 - alpha) ** l * model_a.state_dict()[key] + alpha ** l * sb[key].to(state[key])
    merged.load_state_dict(state)
    return merged.eval()
