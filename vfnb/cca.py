"""CCA merging (Horoi et al. 2024; paper appendix A.8.3): align two networks by canonical correlation
analysis of their activations, with general invertible maps instead of permutations.

For every unit group of the permutation spec (:mod:`vfnb.graph`), CCA finds projections ``P_a``,
``P_b`` that make the canonical variates ``P_a f_a`` and ``P_b f_b`` of the two models' activations
maximally correlated. The map ``T = P_a⁻¹ P_b`` takes model b's units into model a's basis, and the
merged weights are (paper A.8.3)

    W_α⁽ˡ⁾ = (1−α)·W_a⁽ˡ⁾ + α·T⁽ˡ⁾ W_b⁽ˡ⁾ (T⁽ˡ⁻¹⁾)⁻¹,     b_α⁽ˡ⁾ = (1−α)·b_a⁽ˡ⁾ + α·T⁽ˡ⁾ b_b⁽ˡ⁾.

With whitening ``Σ^{-1/2}`` and the SVD ``Σ_aa^{-1/2} Σ_ab Σ_bb^{-1/2} = U S Vᵀ`` one has
``P_a = Uᵀ Σ_aa^{-1/2}``, ``P_b = Vᵀ Σ_bb^{-1/2}`` and ``T = Σ_aa^{1/2} U Vᵀ Σ_bb^{-1/2}``.

**The alignment interface.** :func:`cca_matching` returns a :class:`LinearAlignment`, which plays the
role a :class:`~vfnb.graph.Permutation` plays for weight/activation matching:

- ``alignment.apply(model_b)`` is model b with ``W ← T W T_prev⁻¹`` (the "aligned" partner to
  interpolate with model a, as ``apply_permutation(model_b, perm)`` is for permutations);
- ``alignment.map_activation(x, group, axis, block)`` maps one of model b's *activations* into model
  a's basis (``T x``); :func:`vfnb.pfm.preserve_first` uses it on the stem outputs, so the preserved
  stem of model b stays the original, well-trained model b.

A permutation is the special case ``T = Π`` (:meth:`LinearAlignment.from_permutation`). Unlike a
permutation, ``T`` does not commute with ReLU or max-pooling, so ``apply(model_b)`` computes a
*different* function from model b: this is why CCA merging needs post-merging normalization
(paper A.8.3). Norm layers (BatchNorm, LayerNorm) act per channel and cannot follow a general
linear map; CCA here supports networks without normalization (VGG with ``norm="none"``, MLPs).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .activations import JointMoments, collect_paired, peek
from .graph import Entry, Permutation, PermutationSpec, active_groups, permutation_spec
from .structure import WEIGHT_TYPES
from .validate import UnsupportedOperationError, check_finite, check_same_architecture

__all__ = ["LinearAlignment", "cca_matching", "cca_transform", "fingerprint", "block_of", "group_of_value",
           "map_entry"]


def fingerprint(model: nn.Module) -> tuple[float, ...]:
    """A cheap signature of a model's weights (sum and sum of squares of every floating tensor, in
    float64): tells the model an alignment was computed for from any other trained model."""
    out: list[float] = []
    for v in model.state_dict().values():
        if v.is_floating_point():
            d = v.detach().double()
            out += [float(d.sum()), float((d * d).sum())]
    return tuple(out)


def _same_fingerprint(a: Sequence[float], b: Sequence[float], rtol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


def _weight_role(model: nn.Module, e: Entry) -> str:
    """``"out"`` (rows of a conv/linear weight, or its bias), ``"in"`` (its input-feature axis), or
    raise: a general linear map on channels can only pass through conv/linear parameters."""
    module_name, _, attr = e.key.rpartition(".")
    mod = model.get_submodule(module_name) if module_name else model
    if isinstance(mod, WEIGHT_TYPES) and attr == "weight" and e.axis in (0, 1):
        return "out" if e.axis == 0 else "in"
    if isinstance(mod, WEIGHT_TYPES) and attr == "bias" and e.axis == 0:
        return "out"
    raise UnsupportedOperationError(
        f"{e.key!r} (a {type(mod).__name__} parameter) acts per channel and cannot follow the general linear maps "
        "of CCA merging; CCA supports networks whose aligned units pass only through conv/linear layers (e.g. "
        "VGG with norm='none'). For BatchNorm/LayerNorm networks use activation matching")


def _check_linear_spec(spec: PermutationSpec, model: nn.Module, groups: Sequence[int]) -> None:
    for gi in groups:
        for e in spec.groups[gi].entries:
            _weight_role(model, e)


@dataclass(eq=False)
class LinearAlignment:
    """One invertible matrix per unit group of ``spec``: ``T[g]`` maps model b's units of group ``g``
    into model a's basis (``f_a ≈ T f_b``). Built by :func:`cca_matching`, or from a permutation.

    ``source`` is the :func:`fingerprint` of the model b it was computed for (``None``: unchecked);
    :meth:`apply` refuses another model.
    """
    spec: PermutationSpec
    transforms: tuple[torch.Tensor, ...]
    source: tuple[float, ...] | None = field(default=None, repr=False)
    correlations: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._check_transforms()
        self._inverses = tuple(torch.linalg.inv(t) for t in self.transforms)

    def _check_transforms(self) -> None:
        """Store the maps as float64 on the CPU; one square, finite matrix per group."""
        self.transforms = tuple(torch.as_tensor(t, dtype=torch.float64).cpu() for t in self.transforms)
        if len(self.transforms) != len(self.spec.groups):
            raise ValueError(f"{len(self.transforms)} transforms given for {len(self.spec.groups)} groups")
        for g, t in zip(self.spec.groups, self.transforms):
            if t.shape != (g.size, g.size):
                raise ValueError(f"group {g.index} needs a {g.size}×{g.size} matrix, got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"the transform of group {g.index} has non-finite entries")

    @classmethod
    def from_permutation(cls, perm: Permutation) -> LinearAlignment:
        """The permutation matrices of ``perm`` (new unit ``j`` = old unit ``perm[g][j]``)."""
        eye = [torch.eye(len(p), dtype=torch.float64)[p] for p in perm.perms]
        return cls(perm.spec, tuple(eye))

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, g: int) -> torch.Tensor:
        return self.transforms[g]

    def inverse(self, g: int) -> torch.Tensor:
        return self._inverses[g]

    def check_source(self, model_b: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model_b`` fits the spec and is the model this alignment was made for."""
        self.spec.check_model(model_b)
        if self.source is not None and not _same_fingerprint(self.source, fingerprint(model_b)):
            how = {"TransportAlignment": "ot_matching"}.get(type(self).__name__, "cca_matching")
            raise ValueError("this alignment was computed for another model_b (its weights differ): an alignment "
                             f"belongs to one pair of models; run {how} on this pair")

    @torch.no_grad()
    def apply(self, model_b: nn.Module) -> nn.Module:
        """A copy of ``model_b`` expressed in model a's unit basis: every conv/linear weight becomes
        ``T_out · W · T_in⁻¹`` and every bias ``T_out · b`` (paper A.8.3). ``model_b`` is untouched."""
        self.check_source(model_b)
        moved = [g.index for g, t in zip(self.spec.groups, self.transforms)
                 if not torch.equal(t, torch.eye(len(t), dtype=t.dtype, device=t.device))]
        _check_linear_spec(self.spec, model_b, moved)
        new = copy.deepcopy(model_b)
        state = new.state_dict()
        for key, entries in self.spec.by_key().items():
            t = state[key].double()
            for gi, e in entries:
                if gi not in moved:
                    continue
                role = _weight_role(model_b, e)
                t = map_entry(t, self.transforms[gi] if role == "out" else self.inverses_t(gi), e)
            state[key].copy_(t.to(state[key].dtype))
        return new

    def inverses_t(self, g: int) -> torch.Tensor:
        """``(T⁻¹)ᵀ``: the map on an input-feature axis, since ``W T⁻¹`` = ``((T⁻¹)ᵀ Wᵀ)ᵀ``."""
        return self._inverses[g].T

    def map_activation(self, x: torch.Tensor, group: int, axis: int = 1, block: int = 1) -> torch.Tensor:
        """``T[group]`` applied to model b's activation ``x`` whose ``axis`` holds the group's units
        (in blocks of ``block`` entries): the activation in model a's basis."""
        return _matmul_axis(x, self.transforms[group].to(x), axis, block)

    def __repr__(self) -> str:
        moved = sum(not torch.equal(t, torch.eye(len(t), dtype=t.dtype, device=t.device)) for t in self.transforms)
        return f"LinearAlignment({len(self)} groups, {moved} not identity, of {self.spec.model_type})"


def _matmul_axis(t: torch.Tensor, m: torch.Tensor, axis: int, block: int = 1) -> torch.Tensor:
    """``m`` applied to the units on ``axis`` of ``t`` (unit ``i`` = entries ``i*block..(i+1)*block-1``):
    ``out[..., i, ...] = Σ_j m[i, j] · t[..., j, ...]``."""
    size = m.shape[0]
    moved = t.movedim(axis, -1)
    shape = moved.shape
    u = moved.reshape(*shape[:-1], size, block)
    out = torch.einsum("ij,...jb->...ib", m.to(device=t.device, dtype=t.dtype), u)
    return out.reshape(shape).movedim(-1, axis)


def map_entry(t: torch.Tensor, m: torch.Tensor, e: Entry) -> torch.Tensor:
    """``m`` applied to the units of entry ``e`` of tensor ``t`` (``out_i = Σ_j m[i, j] · unit_j``, each
    unit's ``block`` entries alike), wherever they sit on the axis (``positions``) and only inside
    ``rows``; the rest of ``t`` is unchanged. A permutation matrix reproduces :func:`~vfnb.graph.permute_tensor`."""
    if e.rows is not None:
        ra, lo, hi = e.rows
        out = t.clone()
        sub = out.narrow(ra, lo, hi - lo)
        sub.copy_(map_entry(sub, m, e._replace(rows=None)))
        return out
    if e.positions is None:
        return _matmul_axis(t, m, e.axis, e.block)
    idx = e.index(t.shape[e.axis]).to(t.device)
    return t.index_copy(e.axis, idx, _matmul_axis(t.index_select(e.axis, idx), m, e.axis, e.block))


def _sym_power(s: torch.Tensor, power: float) -> torch.Tensor:
    """``s^power`` of a symmetric positive definite matrix via its eigendecomposition."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp_min(1e-300).pow(power)) @ vecs.T


def cca_transform(cov_aa: torch.Tensor, cov_ab: torch.Tensor, cov_bb: torch.Tensor, reg: float = 0.5,
                  tie: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, canonical correlations)`` for one group from its covariance blocks.

    Each auto-covariance is shrunk towards a multiple of the identity, ``(1−reg)·Σ + reg·mean(diag Σ)·I``
    (Ledoit–Wolf style; dead or collinear units make ``Σ`` singular, and weakly varying directions would
    otherwise be amplified by ``Σ^{-1/2}``). ``reg → 0`` is plain CCA; ``reg → 1`` whitens by a scalar
    only, and ``T`` becomes the orthogonal Procrustes map between the two activation sets. ``T = Σ_aa^{1/2} U Vᵀ Σ_bb^{-1/2}``, with ``U S Vᵀ`` the SVD of
    ``Σ_aa^{-1/2} Σ_ab Σ_bb^{-1/2}``; ``S`` holds the canonical correlations.

    Directions with no correlation at all (units that never vary on the data, e.g. dead ReLUs) leave
    ``U Vᵀ`` undetermined there. Ties are broken towards the activation-matching permutation: model b's
    units are first put in the order that maximizes the summed Pearson correlation (the LAP of
    activation matching), and ``tie·max(S)·I`` is added before taking the polar factor. With real
    correlations the effect is negligible; in the degenerate directions ``T`` falls back to that
    permutation, so for a permuted copy of model a, ``T`` is exactly the inverse permutation.
    """
    d = cov_aa.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    sd_a, sd_b = cov_aa.diagonal().clamp_min(0).sqrt(), cov_bb.diagonal().clamp_min(0).sqrt()
    pearson = cov_ab / torch.outer(sd_a + 1e-12, sd_b + 1e-12)
    _, col = linear_sum_assignment(pearson.numpy(), maximize=True)
    order = eye[torch.from_numpy(col).long()]  # (order · f_b)_i = f_b[col[i]]
    cov_ab, cov_bb = cov_ab @ order.T, order @ cov_bb @ order.T
    ra = (1 - reg) * cov_aa + reg * max(float(cov_aa.diagonal().mean()), 1e-12) * eye
    rb = (1 - reg) * cov_bb + reg * max(float(cov_bb.diagonal().mean()), 1e-12) * eye
    a_inv, b_inv = _sym_power(ra, -0.5), _sym_power(rb, -0.5)
    m = a_inv @ cov_ab @ b_inv
    s = torch.linalg.svdvals(m)
    u, _, vh = torch.linalg.svd(m + tie * max(float(s[0]), 1e-12) * eye)
    return _sym_power(ra, 0.5) @ u @ vh @ b_inv @ order, s


@torch.no_grad()
def cca_matching(model_a: nn.Module, model_b: nn.Module, data, example_input: torch.Tensor | None = None,
                 layers: int | None = None, reg: float = 0.5, batch_size: int = 500,
                 max_batches: int | None = None) -> LinearAlignment:
    """CCA merging's alignment of ``model_b`` to ``model_a`` (Horoi et al. 2024; paper appendix A.8.3).

    One streaming pass over ``data`` (as :func:`~vfnb.matching.activation_matching`: a VisionData
    read without augmentation, a tensor, or an iterable of batches) collects, per unit group, the
    joint covariance of the two models' activations at the group's alignment points (after the
    nonlinearity; every position of a conv map is a sample; a residual group pools its points).
    :func:`cca_transform` turns each into ``T``. ``layers=l`` aligns only the groups of the first
    ``l`` layers (identity after). Returns a :class:`LinearAlignment`.

    ``reg`` is the covariance shrinkage of :func:`cca_transform`. Its default 0.5 sits in a flat range:
    on the book's cpu VGG16 pair, the merged midpoint scored 0.92–0.94 on *training* images for every
    ``reg`` in [0.1, 0.9], while ``reg = 1e-4`` gave maps with condition numbers up to ~700 and chance
    accuracy (weakly varying directions amplified by ``Σ^{-1/2}``).
    """
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not 0 < reg < 1:
        raise ValueError(f"reg must be a number in (0, 1) (shrinkage of the covariances towards the identity), "
                         f"got {reg!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first, stream = peek(data, batch_size, model_a, "CCA matching")
    spec = permutation_spec(model_a, first[:2] if example_input is None else example_input)
    spec.check_in_order("CCA merging", active_groups(spec, layers))
    active = active_groups(spec, layers)
    _check_linear_spec(spec, model_b, active)  # fail before the data pass
    stats = collect_paired(model_a, model_b, spec, active, stream, JointMoments, max_batches)
    transforms = [torch.eye(g.size, dtype=torch.float64) for g in spec.groups]
    corrs = [torch.ones(g.size, dtype=torch.float64) for g in spec.groups]
    for gi in active:
        parts = [m for (h, _), m in stats.items() if h == gi]
        if not parts:
            continue
        total = JointMoments(spec.groups[gi].size, parts[0].s.device)
        for m in parts:
            total.merge(m)
        transforms[gi], corrs[gi] = cca_transform(*total.blocks(), reg=reg)
    return LinearAlignment(spec, tuple(transforms), source=fingerprint(model_b), correlations=tuple(corrs))


def group_of_value(spec: PermutationSpec, node_name: str, model: nn.Module) -> int | None:
    """The unit group carried by the channels of fx node ``node_name`` of ``spec.graph``: the group of
    the input-feature axis of the first conv/linear layer that consumes it (directly or through
    element-wise ops, norms, pooling, reshapes, additions). ``None``: the value is never permuted."""
    nodes = {n.name: n for n in spec.graph.nodes}
    frontier, seen = [nodes[node_name]], set()
    while frontier:
        n = frontier.pop(0)
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module" and isinstance(model.get_submodule(str(u.target)), WEIGHT_TYPES):
                g = spec.group_of(f"{u.target}.weight", 1)
                return None if g is None else g.index
            if u.op != "output":
                frontier.append(u)
    return None


def block_of(x_shape: Sequence[int], size: int) -> tuple[int, int]:
    """``(axis, block)`` of a group of ``size`` units in an activation of shape ``x_shape``: the channel
    axis of a conv map (block 1), the last axis of a token sequence ``[N, tokens, size]``, or the feature
    axis of a flat ``[N, size·block]`` tensor. A guess from the shape (tokens == size picks axis 1)."""
    if len(x_shape) > 2:
        if x_shape[1] != size and x_shape[-1] == size:
            return len(x_shape) - 1, 1
        return 1, 1
    if x_shape[-1] % size:
        raise UnsupportedOperationError(f"an activation of shape {list(x_shape)} cannot hold {size} units in blocks")
    return len(x_shape) - 1, x_shape[-1] // size

