"""Preserve-First Merging and partial zipping (paper §5.4, Fig. 4 right, Table 1; appendix A.8.2).

**PFM_{l/L}** keeps the first ``l`` of the ``L`` conv/linear layers of both edge models unmerged: two
*stems* see the same input, model b's stem output is aligned to model a (by the permutation, or the
CCA map), the two are averaged with weights (1−α, α), and the result feeds the *tail*, the
interpolation (1−α)·θ_a + α·π(θ_b) of the remaining layers. ``l = 0`` is ordinary merging; ``l = L``
averages the two models' logits (the ensemble).

**Partial zipping** (ZipIt!, Stoica et al. 2024) does the opposite: a merged *trunk* (the first
``L − k`` layers) feeds two unmerged *heads* (the last ``k`` layers of each edge model), whose logits
are averaged.

**Where the network is cut.** Layers are counted as the paper counts them
(:func:`vfnb.normalize.conv_linear_layers`: conv/linear on the longest input→output path, shortcut
convs excluded; VGG16 14, ResNet20 20). The model's ``torch.fx`` graph is split generally, with no
per-architecture code: every conv/linear node whose longest-path depth exceeds the cut, and every node
computed from one, goes to the back part (tail / heads); everything else to the front part (stems /
trunk). A layer's norm, activation and pooling thus stay with it, and a shortcut conv goes to the side
of the block it runs parallel to. The front part returns *every* tensor the back part reads: for a
chain (VGG) that is one activation, the input of layer ``l+1``; for a ResNet cut at a block boundary
it is the residual stream; for a cut inside a block it is the stream and the block's inner branch, both
averaged. Constants (``get_attr``) are copied to both parts, never averaged.

**Normalization** (``normalize=``) acts on the merged part only, with the edge models' statistics of
the same layers as reference: ``"repair"`` and ``"rescale"`` (Eq. 2 targets (1−α)·stat_a + α·stat_b of the
aligned edge models, :mod:`vfnb.normalize`), ``"reset"`` (re-estimate the merged part's BatchNorm
statistics; the preserved stems keep the edge models'), and ``"bias_calibration"`` (§5.3: the bias of the
``j``-th merged layer becomes (1−α)^j·b_a + α^j·b_b, ``j`` counted from the first *merged* layer, since the
stems hand the tail features that have not shrunk yet).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from .cca import LinearAlignment, WEIGHT_TYPES, _group_of_value, block_of
from .graph import Permutation, PermutationSpec, UnsupportedOperationError, _depths, apply_permutation, permutation_spec
from .matching import _inputs as _batches
from .merge import check_alpha, check_same_architecture
from .models import device_of
from .normalize import BN_TYPES, _inputs, repair, repair_layers, rescale, target_stats

__all__ = ["preserve_first", "partial_zip", "PreserveFirst", "PartialZip", "ChannelMap", "NORMALIZATIONS"]

#: What ``normalize=`` accepts.
NORMALIZATIONS = (None, "repair", "rescale", "reset", "bias_calibration")

Alignment = Union[Permutation, LinearAlignment, None]


# ---------------------------------------------------------------------------------------------------
# modules
class ChannelMap(nn.Module):
    """``x ↦ T x`` on the channels (axis 1) of an activation, in blocks of ``block`` features for a
    flattened ``[N, C·block]`` tensor: model b's stem output in model a's basis (CCA alignment).
    ``T`` is a frozen parameter, so :func:`vfnb.flops.count_cost` counts it."""

    def __init__(self, matrix: torch.Tensor, block: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(matrix.detach().float().clone(), requires_grad=False)
        self.block = int(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block == 1:
            return torch.einsum("ij,nj...->ni...", self.weight, x)
        y = torch.einsum("ij,njb->nib", self.weight, x.unflatten(1, (self.weight.shape[0], self.block)))
        return y.flatten(1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} channels" + (f", block {self.block}" if self.block > 1 else "")


class PreserveFirst(nn.Module):
    """A PFM_{l/L} model (paper Fig. 4 right): ``tail((1−α)·stems[0](x) + α·stems[1](x))``.

    ``stems[0]`` is the first ``layers`` layers of model a, ``stems[1]`` those of model b with its
    outputs in model a's basis, ``tail`` the merged remainder. Each part is a ``torch.fx.GraphModule``
    whose submodules keep the edge model's names (``stems.0.features.0``, ``tail.classifier``). The
    stems return tuples (one tensor per value that crosses the cut, named in ``crossing``).
    """

    def __init__(self, stem_a: fx.GraphModule, stem_b: fx.GraphModule, tail: fx.GraphModule, alpha: float,
                 layers: int, num_layers: int, crossing: tuple[str, ...], stem_layers: tuple[str, ...],
                 tail_layers: tuple[str, ...], normalize: str | None = None) -> None:
        super().__init__()
        self.stems = nn.ModuleList([stem_a, stem_b])
        self.tail = tail
        self.alpha, self.layers, self.num_layers = float(alpha), int(layers), int(num_layers)
        self.crossing, self.stem_layers, self.tail_layers = crossing, stem_layers, tail_layers
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        za, zb = self.stems[0](x), self.stems[1](x)
        a = self.alpha
        return self.tail(*[(1 - a) * u + a * v for u, v in zip(za, zb)])

    def extra_repr(self) -> str:
        return (f"PFM_{self.layers}/{self.num_layers}, alpha={self.alpha:g}, normalize={self.normalize}, "
                f"averaged at: {', '.join(self.crossing)}")


class PartialZip(nn.Module):
    """A partially zipped model (ZipIt!; paper A.8.2): ``(1−α)·heads[0](z) + α·heads[1](z)`` with
    ``z = trunk(x)``; the trunk is the merged first ``L − k`` layers, the heads the last ``k`` layers of
    model a and of the aligned model b."""

    def __init__(self, trunk: fx.GraphModule, head_a: fx.GraphModule, head_b: fx.GraphModule, alpha: float,
                 layers: int, num_layers: int, crossing: tuple[str, ...], trunk_layers: tuple[str, ...],
                 head_layers: tuple[str, ...], normalize: str | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList([head_a, head_b])
        self.alpha, self.layers, self.num_layers = float(alpha), int(layers), int(num_layers)
        self.crossing, self.trunk_layers, self.head_layers = crossing, trunk_layers, head_layers
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return (1 - self.alpha) * self.heads[0](*z) + self.alpha * self.heads[1](*z)

    def extra_repr(self) -> str:
        return (f"last {self.layers} of {self.num_layers} layers unmerged, alpha={self.alpha:g}, "
                f"normalize={self.normalize}, heads read: {', '.join(self.crossing)}")


# ---------------------------------------------------------------------------------------------------
# the cut
@dataclass(frozen=True)
class _Cut:
    front: fx.Graph
    back: fx.Graph
    crossing: tuple[str, ...]           # fx names of the values the back part reads from the front part
    front_layers: tuple[str, ...]       # conv/linear module names, graph order
    back_layers: tuple[str, ...]
    depth: dict[str, int]               # conv/linear module -> longest-path depth (1-based)


def _keeps(node: fx.Node) -> bool:
    """Dead-code elimination keeps the inputs and the output; every module call here is pure."""
    return node.op in ("placeholder", "output")


def _cut(spec: PermutationSpec, model: nn.Module, depth: int) -> _Cut:
    """Split ``spec.graph`` after layer ``depth`` (see the module docstring)."""
    graph = spec.graph
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise UnsupportedOperationError("PFM and partial zipping need a model with exactly one input")
    modules = dict(model.named_modules())
    layer_nodes = [n for n in nodes if n.op == "call_module" and isinstance(modules.get(str(n.target)), WEIGHT_TYPES)]
    names = [str(n.target) for n in layer_nodes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UnsupportedOperationError(f"layer(s) {twice} run more than once per forward pass; a cut between their "
                                        "calls would duplicate shared weights")
    is_layer = set(layer_nodes)
    lp, _, _ = _depths(graph, is_layer)
    dep: set[fx.Node] = set()   # nodes computed from the input
    back: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(i in dep for i in n.all_input_nodes):
            dep.add(n)
        if (n in is_layer and lp[n] > depth) or n.op == "output" \
                or (n in dep and any(i in back for i in n.all_input_nodes)):
            back.add(n)
    crossing = [n for n in nodes if n not in back and n in dep and any(u in back for u in n.users)]

    front = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n not in back:
            env[n] = front.node_copy(n, lambda m: env[m])
    front.output(tuple(env[c] for c in crossing))
    front.eliminate_dead_code(is_impure_node=_keeps)

    rear = fx.Graph()
    renv: dict[fx.Node, fx.Node] = {c: rear.placeholder(c.name) for c in crossing}

    def get(m: fx.Node) -> fx.Node:  # constants the back part needs are copied, never averaged
        if m not in renv:
            renv[m] = rear.node_copy(m, get)
        return renv[m]

    for n in nodes:
        if n in back:
            renv[n] = rear.node_copy(n, get)
    rear.eliminate_dead_code(is_impure_node=_keeps)
    in_front = {str(n.target) for n in front.nodes if n.op == "call_module"}
    in_back = {str(n.target) for n in rear.nodes if n.op == "call_module"}
    depth_of = {str(n.target): lp[n] for n in layer_nodes}
    return _Cut(front, rear, tuple(c.name for c in crossing), tuple(n for n in names if n in in_front),
                tuple(n for n in names if n in in_back), depth_of)


def _module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph, class_name=name)
    gm.eval()
    return gm


# ---------------------------------------------------------------------------------------------------
# shared checks and steps
def _check_layers(layers: Any, total: int, what: str) -> int:
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= total:
        raise ValueError(f"{what} must be an integer in [0, {total}] (this model has {total} conv/linear layers as "
                         f"the paper counts them), got {layers!r}")
    return layers


def _example(data: Any, example_input: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
        return example_input[:1]
    if data is None:
        raise ValueError("direct merging (perm=None) needs data= or example_input= to trace the model")
    first = next(_batches(data, 2, device), None)
    if first is None:
        raise ValueError("data is empty")
    return first[:1]


def _resolve(model_a: nn.Module, model_b: nn.Module, perm: Alignment, data: Any,
             example_input: torch.Tensor | None) -> tuple[PermutationSpec, nn.Module]:
    """The spec to cut along, and model b in model a's basis (the partner to interpolate with)."""
    check_same_architecture(model_a, model_b)
    if perm is None:
        spec = permutation_spec(model_a, _example(data, example_input, device_of(model_a)))
        return spec, model_b
    if isinstance(perm, Permutation):
        for m, which in ((model_a, "model_a"), (model_b, "model_b")):
            try:
                perm.spec.check_model(m)
            except ValueError as err:
                raise ValueError(f"perm does not fit {which}: {err}") from None
        return perm.spec, apply_permutation(model_b, perm)
    if isinstance(perm, LinearAlignment):
        try:
            perm.spec.check_model(model_a)
        except ValueError as err:
            raise ValueError(f"the alignment does not fit model_a: {err}") from None
        return perm.spec, perm.apply(model_b)  # checks that it was computed for this model_b
    raise TypeError(f"perm must be a vfnb Permutation (weight/activation matching), a LinearAlignment "
                    f"(cca_matching) or None (direct merging), got {type(perm).__name__}")


def _check_normalize(normalize: Any, data: Any, model_a: nn.Module) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize={normalize!r}; choose one of {', '.join(map(repr, NORMALIZATIONS))}")
    if normalize in ("repair", "rescale", "reset") and data is None:
        raise ValueError(f"normalize={normalize!r} needs data= (calibration images for the channel statistics)")
    has_bn = any(isinstance(m, BN_TYPES) for m in model_a.modules())
    if normalize == "reset" and not has_bn:
        raise ValueError("normalize='reset' re-estimates BatchNorm statistics, but the model has no BatchNorm; "
                         "use 'repair' or 'rescale'")
    if normalize == "bias_calibration" and has_bn:
        raise ValueError("normalize='bias_calibration' refuses BatchNorm models (BN re-centres every channel, so "
                         "its running statistics would no longer fit the calibrated biases); use 'reset'")


@torch.no_grad()
def _merge(model_a: nn.Module, partner: nn.Module, alpha: float, calibrate: bool, depth: dict[str, int],
           offset: int) -> nn.Module:
    """(1−α)·θ_a + α·θ_b; with ``calibrate``, the bias of a layer at depth ``d > offset`` becomes
    (1−α)^(d−offset)·b_a + α^(d−offset)·b_b (bias calibration counted from the first merged layer)."""
    merged = copy.deepcopy(model_a)
    sa, sb = model_a.state_dict(), partner.state_dict()
    state = {k: torch.lerp(v, sb[k].to(v), alpha) if v.is_floating_point() else v.clone() for k, v in sa.items()}
    if calibrate:
        for name, d in depth.items():
            key = f"{name}.bias"
            if d > offset and key in state:
                j = d - offset
                state[key] = (1 - alpha) ** j * sa[key] + alpha ** j * sb[key].to(sa[key])
    merged.load_state_dict(state)
    return merged.eval()


@torch.no_grad()
def _reset_part(model: nn.Module, part: nn.Module, data: Any, n_samples: int | None) -> None:
    """RESET restricted to the BatchNorms of ``part`` (a submodule of ``model``): their statistics are
    re-estimated (cumulative average, no gradients) on ``model``'s forward passes over ``data``."""
    bns = [m for m in part.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return  # nothing merged carries BatchNorm (e.g. every layer preserved)
    x = _inputs(data, n_samples)
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        model(x.to(device_of(model)))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()


def _normalize_part(model: nn.Module, prefix: str, part_layers: tuple[str, ...], normalize: str | None,
                    model_a: nn.Module, partner: nn.Module, alpha: float, data: Any,
                    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
                    n_samples: int | None) -> nn.Module:
    if normalize == "reset":
        _reset_part(model, model.get_submodule(prefix), data, n_samples)
    elif normalize in ("repair", "rescale"):
        layers = [n for n in repair_layers(model_a) if n in part_layers]
        if not layers:
            return model  # no merged hidden layer left to normalize
        if targets is None:
            targets = target_stats([model_a, partner], [1 - alpha, alpha], data, layers=layers, n_samples=n_samples)
        missing = [n for n in layers if n not in targets]
        if missing:
            raise ValueError(f"targets lack layer(s) {missing}; compute them with target_stats over "
                             "repair_layers(model_a)")
        named = {f"{prefix}.{n}": targets[n] for n in layers}
        fn = repair if normalize == "repair" else rescale
        model = fn(model, data=data, layers=list(named), targets=named, n_samples=n_samples, inplace=True)
    return model


# ---------------------------------------------------------------------------------------------------
# public
def preserve_first(model_a: nn.Module, model_b: nn.Module, perm: Alignment, layers: int, alpha: float = 0.5,
                   normalize: str | None = None, data: Any = None, *,
                   targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   n_samples: int | None = None, example_input: torch.Tensor | None = None) -> PreserveFirst:
    """Preserve-First Merging PFM_{l/L} (paper §5.4, Fig. 4 right, Table 1) with ``l = layers``.

    ``perm`` aligns ``model_b`` to ``model_a``: a :class:`~vfnb.graph.Permutation` (weight or activation
    matching), a :class:`~vfnb.cca.LinearAlignment` (CCA merging), or ``None`` (direct merging).
    With a permutation, model b's stem is the permuted model b (the same function); with a CCA
    alignment it is the original model b followed by :class:`ChannelMap` ``T`` on each value that crosses
    the cut, so the preserved features stay exactly model b's. ``normalize`` (see the module docstring)
    needs ``data`` for ``"repair"``, ``"rescale"`` and ``"reset"``; ``targets`` may pass precomputed Eq. 2
    targets (``target_stats([model_a, aligned b], [1−α, α], data)``, keyed by model a's layer names).

    ``layers = 0`` is the ordinary merged model, ``layers = L`` the logit-averaging ensemble. Inputs are
    left untouched; the result is in eval mode on ``model_a``'s device.
    """
    alpha = check_alpha(alpha)
    spec, partner = _resolve(model_a, model_b, perm, data, example_input)
    l = _check_layers(layers, spec.num_layers, "layers (the number of preserved layers l)")
    _check_normalize(normalize, data, model_a)
    cut = _cut(spec, model_a, l)
    merged = _merge(model_a, partner, alpha, normalize == "bias_calibration", cut.depth, offset=l)
    stem_a = _module(copy.deepcopy(model_a), cut.front, "Stem")
    if isinstance(perm, LinearAlignment):
        stem_b = _mapped_stem(model_b, cut, perm)
    else:
        stem_b = _module(copy.deepcopy(partner), cut.front, "Stem")
    tail = _module(merged, cut.back, "Tail")
    model = PreserveFirst(stem_a, stem_b, tail, alpha, l, spec.num_layers, cut.crossing, cut.front_layers,
                          cut.back_layers, normalize).to(device_of(model_a)).eval()
    return _normalize_part(model, "tail", cut.back_layers, normalize, model_a, partner, alpha, data, targets,
                           n_samples)


def _mapped_stem(model_b: nn.Module, cut: _Cut, alignment: LinearAlignment) -> fx.GraphModule:
    """Model b's own front part, then ``T`` on every crossing value that carries a unit group."""
    graph = fx.Graph()
    out = graph.graph_copy(cut.front, {})
    values = list(out) if isinstance(out, (tuple, list)) else [out]
    root = copy.deepcopy(model_b)
    maps = nn.ModuleList()
    meta = {n.name: n.meta.get("tensor_meta") for n in alignment.spec.graph.nodes}
    for i, name in enumerate(cut.crossing):
        g = _group_of_value(alignment.spec, name, model_b)
        if g is None:
            continue
        shape = tuple(meta[name].shape) if meta.get(name) is not None else None
        if shape is None:
            raise UnsupportedOperationError(f"no shape recorded for {name!r}; cannot map it into model a's basis")
        _, block = block_of(shape, alignment.spec.groups[g].size)
        maps.append(ChannelMap(alignment[g], block))
        values[i] = graph.call_module(f"align.{len(maps) - 1}", (values[i],))
    root.align = maps
    graph.output(tuple(values))
    return _module(root, graph, "Stem")


def partial_zip(model_a: nn.Module, model_b: nn.Module, perm: Alignment, layers: int, alpha: float = 0.5,
                normalize: str | None = None, data: Any = None, *,
                targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                n_samples: int | None = None, example_input: torch.Tensor | None = None) -> PartialZip:
    """Partial zipping (ZipIt!, Stoica et al. 2024; paper appendix A.8.2): the *last* ``k = layers``
    conv/linear layers stay unmerged as two heads on a merged trunk; the heads' logits are averaged
    with weights (1−α, α). ``layers = 0`` is the ordinary merged model, ``layers = L`` the ensemble.

    ``perm``, ``alpha``, ``normalize``, ``data`` and ``targets`` as in :func:`preserve_first`;
    normalization acts on the merged trunk (bias calibration counts from the input, as in §5.3). Model
    b's head is the aligned model b's (for CCA its first layer undoes ``T``, ZipIt!'s "unmerge").
    """
    alpha = check_alpha(alpha)
    spec, partner = _resolve(model_a, model_b, perm, data, example_input)
    k = _check_layers(layers, spec.num_layers, "layers (the number of unmerged last layers k)")
    _check_normalize(normalize, data, model_a)
    cut = _cut(spec, model_a, spec.num_layers - k)
    merged = _merge(model_a, partner, alpha, normalize == "bias_calibration", cut.depth, offset=0)
    trunk = _module(merged, cut.front, "Trunk")
    head_a = _module(copy.deepcopy(model_a), cut.back, "Head")
    head_b = _module(copy.deepcopy(partner), cut.back, "Head")
    model = PartialZip(trunk, head_a, head_b, alpha, k, spec.num_layers, cut.crossing, cut.front_layers,
                       cut.back_layers, normalize).to(device_of(model_a)).eval()
    return _normalize_part(model, "trunk", cut.front_layers, normalize, model_a, partner, alpha, data, targets,
                           n_samples)
