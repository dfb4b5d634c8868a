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
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from .activations import example_input as first_input
from .cca import LinearAlignment, block_of, group_of_value
from .graph import Permutation, PermutationSpec, apply_permutation, permutation_spec
from .merge import interpolate
from .models import device_of
from .normalize import Fix, repair, rescale, reset_bn_stats, target_stats
from .structure import BN_TYPES, Cut, check_layer_count, cut, repair_layers
from .validate import check_alpha, check_finite, check_same_architecture

__all__ = ["preserve_first", "partial_zip", "PreserveFirst", "PartialZip", "ChannelMap", "NORMALIZATIONS"]

#: The fixes ``normalize=`` accepts (:class:`vfnb.normalize.Fix`; None means ``Fix.NONE``).
NORMALIZATIONS = (Fix.NONE, Fix.REPAIR, Fix.RESCALE, Fix.RESET, Fix.BIAS_CALIBRATION)

Alignment = Union[Permutation, LinearAlignment, None]


# ---------------------------------------------------------------------------------------------------
# modules
class ChannelMap(nn.Module):
    """``x ↦ T x`` on the channels (``axis``, 1 by default; the last axis of a token sequence) of an
    activation, in blocks of ``block`` features for a flattened ``[N, C·block]`` tensor: model b's stem
    output in model a's basis (a CCA or transport alignment). ``T`` is a frozen parameter, so
    :func:`vfnb.flops.count_cost` counts it."""

    def __init__(self, matrix: torch.Tensor, block: int = 1, axis: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(matrix.detach().float().clone(), requires_grad=False)
        self.block, self.axis = int(block), int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if self.axis != 1:
            return torch.einsum("ij,...j->...i", w, x.movedim(self.axis, -1)).movedim(-1, self.axis)
        if self.block == 1:
            return torch.einsum("ij,nj...->ni...", w, x)
        y = torch.einsum("ij,njb->nib", w, x.unflatten(1, (self.weight.shape[0], self.block)))
        return y.flatten(1)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]} channels" + (f", block {self.block}" if self.block > 1 else "")
                + (f", axis {self.axis}" if self.axis != 1 else ""))


class PreserveFirst(nn.Module):
    """A PFM_{l/L} model (paper Fig. 4 right): ``tail((1−α)·stems[0](x) + α·stems[1](x))``.

    ``stems[0]`` is the first ``layers`` layers of model a, ``stems[1]`` those of model b with its
    outputs in model a's basis, ``tail`` the merged remainder. Each part is a ``torch.fx.GraphModule``
    whose submodules keep the edge model's names (``stems.0.features.0``, ``tail.classifier``). The
    stems return tuples (one tensor per value that crosses the cut, named in ``crossing``).
    """

    def __init__(self, stem_a: fx.GraphModule, stem_b: fx.GraphModule, tail: fx.GraphModule, alpha: float,
                 layers: int, num_layers: int, crossing: tuple[str, ...], stem_layers: tuple[str, ...],
                 tail_layers: tuple[str, ...], normalize: Fix | str | None = None) -> None:
        super().__init__()
        self.stems = nn.ModuleList([stem_a, stem_b])
        self.tail = tail
        self.alpha, self.layers, self.num_layers = float(alpha), int(layers), int(num_layers)
        self.crossing, self.stem_layers, self.tail_layers = crossing, stem_layers, tail_layers
        self.normalize = Fix.parse(normalize, what="normalize")

    def layer_aliases(self, names: list[str]) -> dict[str, list[str]]:
        """Where each edge-model layer lives in this model: a preserved layer exists twice, once per stem
        (``stems.0.<name>``, ``stems.1.<name>``); a merged one once, in the tail (``tail.<name>``).
        :func:`vfnb.diagnose.feature_bias` averages over the copies (appendix A.8.1)."""
        stem = {n for n, _ in self.stems[0].named_modules()}
        out = {}
        for n in names:  # "<module>:input" (a module's input) follows its module
            mod, colon, what = n.partition(":")
            out[n] = ([f"stems.0.{mod}{colon}{what}", f"stems.1.{mod}{colon}{what}"] if mod in stem
                      else [f"tail.{mod}{colon}{what}"])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        za, zb = self.stems[0](x), self.stems[1](x)
        a = self.alpha
        # sizes and shapes that cross the cut (a transformer's x.shape) are the same in both stems
        return self.tail(*[(1 - a) * u + a * v if isinstance(u, torch.Tensor) and u.is_floating_point() else u
                           for u, v in zip(za, zb)])

    def extra_repr(self) -> str:
        return (f"PFM_{self.layers}/{self.num_layers}, alpha={self.alpha:g}, normalize={self.normalize}, "
                f"averaged at: {', '.join(self.crossing)}")


class PartialZip(nn.Module):
    """A partially zipped model (ZipIt!; paper A.8.2): ``(1−α)·heads[0](z) + α·heads[1](z)`` with
    ``z = trunk(x)``; the trunk is the merged first ``L − k`` layers, the heads the last ``k`` layers of
    model a and of the aligned model b."""

    def __init__(self, trunk: fx.GraphModule, head_a: fx.GraphModule, head_b: fx.GraphModule, alpha: float,
                 layers: int, num_layers: int, crossing: tuple[str, ...], trunk_layers: tuple[str, ...],
                 head_layers: tuple[str, ...], normalize: Fix | str | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList([head_a, head_b])
        self.alpha, self.layers, self.num_layers = float(alpha), int(layers), int(num_layers)
        self.crossing, self.trunk_layers, self.head_layers = crossing, trunk_layers, head_layers
        self.normalize = Fix.parse(normalize, what="normalize")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return (1 - self.alpha) * self.heads[0](*z) + self.alpha * self.heads[1](*z)

    def extra_repr(self) -> str:
        return (f"last {self.layers} of {self.num_layers} layers unmerged, alpha={self.alpha:g}, "
                f"normalize={self.normalize}, heads read: {', '.join(self.crossing)}")


def _module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph, class_name=name)
    gm.eval()
    return gm


# ---------------------------------------------------------------------------------------------------
# shared checks and steps
def _resolve(model_a: nn.Module, model_b: nn.Module, perm: Alignment, data: Any,
             example_input: torch.Tensor | None) -> tuple[PermutationSpec, nn.Module]:
    """The spec to cut along, and model b in model a's basis (the partner to interpolate with)."""
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    if perm is None:
        spec = permutation_spec(model_a, first_input(data, example_input, model_a))
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


def _check_normalize(normalize: Fix | str | None, data: Any, model_a: nn.Module) -> Fix:
    fix = Fix.parse(normalize, NORMALIZATIONS, "normalize")
    if fix.needs_data and data is None:
        raise ValueError(f"normalize={fix.value!r} needs data= (calibration images for the channel statistics)")
    has_bn = any(isinstance(m, BN_TYPES) for m in model_a.modules())
    if fix is Fix.RESET and not has_bn:
        raise ValueError("normalize='reset' re-estimates BatchNorm statistics, but the model has no BatchNorm; "
                         "use 'repair' or 'rescale'")
    if fix is Fix.BIAS_CALIBRATION and has_bn:
        raise ValueError("normalize='bias_calibration' refuses BatchNorm models (BN re-centres every channel, so "
                         "its running statistics would no longer fit the calibrated biases); use 'reset'")
    return fix


def _normalize_part(model: nn.Module, prefix: str, part_layers: tuple[str, ...], normalize: Fix,
                    model_a: nn.Module, partner: nn.Module, alpha: float, data: Any,
                    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
                    n_samples: int | None) -> nn.Module:
    """The fix acts on the merged part ``prefix`` only, with the aligned edge models' statistics of the
    same layers as Eq. 2's reference."""
    if normalize is Fix.RESET:
        reset_bn_stats(model, data, n_samples=n_samples, inplace=True, part=prefix)
    elif normalize in (Fix.REPAIR, Fix.RESCALE):
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
        fn = repair if normalize is Fix.REPAIR else rescale
        model = fn(model, data=data, layers=list(named), targets=named, n_samples=n_samples, inplace=True)
    return model


# ---------------------------------------------------------------------------------------------------
# public
def preserve_first(model_a: nn.Module, model_b: nn.Module, perm: Alignment, layers: int, alpha: float = 0.5,
                   normalize: Fix | str | None = None, data: Any = None, *,
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
    l = check_layer_count(layers, spec.num_layers, "layers (the number of preserved layers l)")
    fix = _check_normalize(normalize, data, model_a)
    c = cut(model_a, spec.graph, l)
    merged = interpolate(model_a, partner, alpha, bias_calibration=fix is Fix.BIAS_CALIBRATION, offset=l)
    stem_a = _module(copy.deepcopy(model_a), c.front, "Stem")
    if isinstance(perm, LinearAlignment):
        stem_b = _mapped_stem(model_b, c, perm)
    else:
        stem_b = _module(copy.deepcopy(partner), c.front, "Stem")
    tail = _module(merged, c.back, "Tail")
    model = PreserveFirst(stem_a, stem_b, tail, alpha, l, spec.num_layers, c.crossing, c.front_layers,
                          c.back_layers, fix).to(device_of(model_a)).eval()
    return _normalize_part(model, "tail", c.back_layers, fix, model_a, partner, alpha, data, targets, n_samples)


def _mapped_stem(model_b: nn.Module, cut: Cut, alignment: LinearAlignment) -> fx.GraphModule:
    """Model b's own front part, then ``T`` on every crossing value that carries a unit group."""
    graph = fx.Graph()
    out = graph.graph_copy(cut.front, {})
    values = list(out) if isinstance(out, (tuple, list)) else [out]
    root = copy.deepcopy(model_b)
    maps = nn.ModuleList()
    meta = {n.name: n.meta.get("vfnb_shape") for n in alignment.spec.graph.nodes}
    for i, name in enumerate(cut.crossing):
        shape = meta.get(name)
        if shape is None:  # not a tensor (a size read off x.shape): passed through unchanged
            continue
        g = group_of_value(alignment.spec, name, model_b)
        if g is None:
            continue
        axis, block = block_of(shape, alignment.spec.groups[g].size)
        maps.append(ChannelMap(alignment[g], block, axis))
        values[i] = graph.call_module(f"align.{len(maps) - 1}", (values[i],))
    root.align = maps
    graph.output(tuple(values))
    return _module(root, graph, "Stem")


def partial_zip(model_a: nn.Module, model_b: nn.Module, perm: Alignment, layers: int, alpha: float = 0.5,
                normalize: Fix | str | None = None, data: Any = None, *,
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
    k = check_layer_count(layers, spec.num_layers, "layers (the number of unmerged last layers k)")
    fix = _check_normalize(normalize, data, model_a)
    c = cut(model_a, spec.graph, spec.num_layers - k)
    merged = interpolate(model_a, partner, alpha, bias_calibration=fix is Fix.BIAS_CALIBRATION)
    trunk = _module(merged, c.front, "Trunk")
    head_a = _module(copy.deepcopy(model_a), c.back, "Head")
    head_b = _module(copy.deepcopy(partner), c.back, "Head")
    model = PartialZip(trunk, head_a, head_b, alpha, k, spec.num_layers, c.crossing, c.front_layers,
                       c.back_layers, fix).to(device_of(model_a)).eval()
    return _normalize_part(model, "trunk", c.front_layers, fix, model_a, partner, alpha, data, targets, n_samples)
