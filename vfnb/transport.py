"""Optimal-transport fusion (OT fusion; Singh & Jaggi 2020, and for transformers Imfeld et al., ICLR 2024,
"Transformer Fusion with Optimal Transport"; the paper's appendix A.8.4 merges ViTs with its
activation-based variant, "OT-acts").

For every unit group of the permutation spec (:mod:`vfnb.graph`), a transport plan ``P`` couples model
a's units (rows) with model b's units (columns):

- **Cost.** ``C[i, j] = E‖a_i − b_j‖²``, the mean squared distance between unit ``i`` of model a and unit
  ``j`` of model b over the data (every token or conv position is a sample), summed over the group's
  capture points (where activation matching reads it: :attr:`vfnb.graph.Group.captures`; the q/k and
  v units of a self-attention ``nn.MultiheadAttention`` are read by projecting its input with each
  model's own ``in_proj_weight`` rows). A group with no activation to read (a cross-attention's
  units) uses the squared distance between the units' weights instead, with the other groups'
  transport maps applied to model b (OT fusion's weight-based variant).
- **Marginals.** Uniform, ``1/n`` on both sides (every unit carries the same mass).
- **Plan.** ``reg = 0``: the exact earth mover's plan, ``ot.emd`` of POT. ``reg > 0``: the entropic plan,
  ``ot.sinkhorn`` (log-domain) on ``C / max C`` with regularization ``reg`` (so ``reg`` is relative to
  the largest cost; smaller is sharper).
- **Map.** ``T = n·P`` has rows and columns that sum to one: ``T b`` is the barycentric projection of
  model b's units onto model a's. With equal sizes and uniform marginals, the exact plan is a vertex of
  the Birkhoff polytope, a permutation: then ``T`` is the permutation of activation matching with
  another cost.
- **Heads.** The heads of an attention move as wholes (:class:`vfnb.graph.Heads`): the head order is the
  assignment that minimizes the summed within-head transport costs of its q/k and v groups, and ``T``
  is block-diagonal in that order, one plan per pair of heads.

**Applying it** (:class:`TransportAlignment`, a :class:`~vfnb.cca.LinearAlignment`). Every tensor axis a
group owns is transported by ``T``: a layer's output rows ``W ← T W`` and biases ``b ← T b``, its input
columns ``W ← W Tᵀ``, and per-channel parameters (LayerNorm's γ and β, class token, positional
embedding) ``γ ← T γ``. This is OT fusion's rule: the input side uses the transport map's transpose
(``T`` is doubly stochastic), not its inverse as CCA does, so a soft plan never amplifies anything. For a
permutation ``T = Π`` it is exactly :func:`~vfnb.graph.apply_permutation`. A soft ``T`` does not commute
with ReLU, GELU, LayerNorm or attention, so the aligned model b computes a different function: what
the post-merging normalizations are for.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .activations import CrossMoments, collect_paired, peek
from .cca import LinearAlignment, fingerprint, map_entry
from .graph import Group, PermutationSpec, active_groups, permutation_spec
from .matching import steps_of, unit_weights
from .validate import check_finite, check_same_architecture

__all__ = ["TransportAlignment", "ot_matching", "transport_plan", "transform_tensor"]


def _check_reg(reg: float) -> float:
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (0 <= reg < float("inf")):
        raise ValueError(f"reg must be a number >= 0 (0: exact earth mover's plan; > 0: entropic, relative to the "
                         f"largest cost), got {reg!r}")
    return float(reg)


def transport_plan(cost: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    """The transport plan between uniform marginals for ``cost`` (``[n_a, n_b]``): ``ot.emd`` for
    ``reg = 0``, else log-domain ``ot.sinkhorn`` on ``cost / (max − min)`` (the cost shifted to start
    at 0) with regularization ``reg``
    (at most 20,000 iterations: below ``reg ≈ 0.01`` Sinkhorn converges slowly and POT warns when it
    stops early; use ``reg = 0`` for a sharp plan). Returns ``P`` (float64; rows sum to ``1/n_a``,
    columns to ``1/n_b``)."""
    import ot  # POT: imported on first use (it pulls in much of scipy)
    reg = _check_reg(reg)
    c = cost.detach().double().cpu().numpy()
    if c.ndim != 2 or 0 in c.shape:
        raise ValueError(f"the transport cost must be a non-empty matrix, got shape {list(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError("the transport cost has non-finite entries (NaN or inf activations or weights)")
    c = c - c.min()  # the plan does not change when a constant is added to the cost; now max(c) is its range
    a = np.full(c.shape[0], 1.0 / c.shape[0])
    b = np.full(c.shape[1], 1.0 / c.shape[1])
    if reg == 0:
        plan = ot.emd(a, b, c, numItermax=10_000_000)
    else:
        scale = max(float(c.max()), 1e-300)
        plan = ot.sinkhorn(a, b, c / scale, reg, method="sinkhorn_log", numItermax=20_000, stopThr=1e-9)
    return torch.from_numpy(np.asarray(plan, dtype=np.float64))


def transform_tensor(t: torch.Tensor, entries: Sequence[tuple[int, object]],
                     transforms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``t`` with every entry's units transported by its group's map (``transforms[group]``), on every
    axis alike: the linear-map counterpart of :func:`~vfnb.graph.permute_tensor`."""
    out = t
    for g, e in entries:
        out = map_entry(out, transforms[g].to(out), e)
    return out


@dataclass(eq=False)
class TransportAlignment(LinearAlignment):
    """OT fusion's alignment of model b to model a: ``T[g] = n·P[g]`` per unit group (see the module
    docstring). :meth:`apply` transports every axis a group owns by ``T`` (input columns too: ``W Tᵀ``,
    not an inverse), including norm parameters and embeddings; :meth:`map_activation`
    is ``T x``, so :func:`vfnb.pfm.preserve_first` maps model b's preserved stem outputs into model a's
    basis. ``plans`` are the transport plans ``P`` themselves; ``reg`` the regularization used."""
    plans: tuple[torch.Tensor, ...] | None = None
    reg: float = 0.0

    def __post_init__(self) -> None:
        self._check_transforms()
        self._inverses = ()  # a soft transport map is not inverted: the input side uses T itself

    @classmethod
    def uniform(cls, spec: PermutationSpec, model_b: nn.Module | None = None) -> TransportAlignment:
        """``T = 11ᵀ/n`` per group: every unit of model b becomes its layer's mean unit. A baseline for soft
        plans (what merging gains by discarding model b's units). It is the ``reg → ∞`` limit of
        :func:`ot_matching` except for an attention's q/k and v groups, where that limit keeps every head
        whole (uniform inside each head); this baseline mixes the heads too."""
        maps = tuple(torch.full((g.size, g.size), 1.0 / g.size, dtype=torch.float64) for g in spec.groups)
        return cls(spec, maps, source=None if model_b is None else fingerprint(model_b),
                   plans=tuple(t / len(t) for t in maps), reg=float("inf"))

    def inverse(self, g: int) -> torch.Tensor:
        raise NotImplementedError("a transport map is applied on input axes as T (OT fusion), not inverted")

    def inverses_t(self, g: int) -> torch.Tensor:
        return self.transforms[g]

    def is_permutation(self, atol: float = 1e-9) -> bool:
        """Whether every map is a permutation matrix (the exact plan of equal-size groups)."""
        def one(t: torch.Tensor) -> bool:
            r = t.round()
            return bool(((t - r).abs() <= atol).all() and ((r == 0) | (r == 1)).all()
                        and (r.sum(0) == 1).all() and (r.sum(1) == 1).all())
        return all(one(t) for t in self.transforms)

    @torch.no_grad()
    def apply(self, model_b: nn.Module) -> nn.Module:
        """A copy of ``model_b`` transported into model a's units: every tensor axis a group owns becomes
        ``T``·(that axis) (output rows, input columns, biases, norm parameters, embeddings alike)."""
        self.check_source(model_b)
        new = copy.deepcopy(model_b)
        state = new.state_dict()
        for key, entries in self.spec.by_key().items():
            t = transform_tensor(state[key].double(), entries, self.transforms)
            state[key].copy_(t.to(state[key].dtype))
        return new

    def __repr__(self) -> str:
        moved = sum(not torch.equal(t, torch.eye(len(t), dtype=t.dtype)) for t in self.transforms)
        kind = "exact" if self.reg == 0 else "uniform" if self.reg == float("inf") else f"entropic reg={self.reg:g}"
        return f"TransportAlignment({len(self)} groups, {moved} not identity, {kind}, of {self.spec.model_type})"


def _sq_dist(m: CrossMoments) -> torch.Tensor:
    """``E‖x_i − y_j‖²`` from streaming moments."""
    n = max(m.n, 1)
    return ((m.sxx[:, None] + m.syy[None, :] - 2 * m.sxy) / n).clamp_min(0).cpu()


def _weight_cost(spec: PermutationSpec, gi: int, sa: dict, sb: dict, by_key: dict,
                 transforms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared distance between the units' weights (all tensors the group owns), with the other groups'
    maps applied to model b."""
    a, b = unit_weights(spec, gi, sa, sb, by_key, lambda t, others: transform_tensor(t, others, transforms))
    return torch.cdist(a, b).square()


def _plan_step(groups: Sequence[Group], costs: Sequence[torch.Tensor], reg: float,
               free_heads: bool) -> list[torch.Tensor]:
    """Plans for one step: a single group, or the linked groups of one attention (heads as wholes)."""
    if groups[0].heads is None:
        return [transport_plan(costs[0], reg)]
    n_heads = len(groups[0].heads.blocks)
    blocks = [[torch.tensor(b, dtype=torch.long) for b in g.heads.blocks] for g in groups]
    total = np.zeros((n_heads, n_heads))
    for bl, c in zip(blocks, costs):
        for h in range(n_heads):
            for k in range(n_heads) if free_heads else [h]:
                sub = c.index_select(0, bl[h]).index_select(1, bl[k])
                total[h, k] += float((transport_plan(sub, 0.0) * sub).sum())  # exact within-head OT cost
    order = linear_sum_assignment(total)[1] if free_heads else np.arange(n_heads)
    plans = []
    for g, bl, c in zip(groups, blocks, costs):
        plan = torch.zeros(g.size, g.size, dtype=torch.float64)
        for h in range(n_heads):
            k = int(order[h])
            sub = transport_plan(c.index_select(0, bl[h]).index_select(1, bl[k]), reg)
            plan[bl[h][:, None], bl[k][None, :]] = sub / n_heads
        plans.append(plan)
    return plans


@torch.no_grad()
def ot_matching(model_a: nn.Module, model_b: nn.Module, data, example_input: torch.Tensor | None = None,
                layers: int | None = None, reg: float = 0.0, batch_size: int = 500,
                max_batches: int | None = None) -> TransportAlignment:
    """OT fusion's alignment of ``model_b`` to ``model_a`` from activations (OT-acts; Imfeld et al. 2024;
    paper appendix A.8.4, Table 5).

    One streaming pass over ``data`` (as :func:`~vfnb.matching.activation_matching`: a VisionData read
    without augmentation, a tensor, or an iterable of batches) collects, per unit group, the cost
    ``C[i, j] = E‖a_i − b_j‖²`` between the two models' units at the group's capture points (summed over
    the points). Marginals are uniform; ``reg = 0`` gives the exact plan (``ot.emd``), ``reg > 0`` the
    entropic one (``ot.sinkhorn`` on ``C / max C``). ``T = n·P`` (module docstring). Groups without a
    capture point use the weights' squared distances after the other groups' maps, and an attention's
    heads move as wholes. ``layers=l`` aligns only the
    groups of the first ``l`` layers (identity after). Returns a :class:`TransportAlignment`, which
    :func:`~vfnb.merge.interpolate` (through ``alignment.apply(model_b)``),
    :func:`~vfnb.pfm.preserve_first` and the normalizations accept like CCA's alignment.
    """
    reg = _check_reg(reg)
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first, stream = peek(data, batch_size, model_a, "OT matching")
    spec = permutation_spec(model_a, first[:2] if example_input is None else example_input)
    active = active_groups(spec, layers)
    stats = collect_paired(model_a, model_b, spec, active, stream, CrossMoments, max_batches)
    transforms = [torch.eye(g.size, dtype=torch.float64) for g in spec.groups]
    plans = [torch.eye(g.size, dtype=torch.float64) / g.size for g in spec.groups]
    costs: dict[int, torch.Tensor] = {}
    dead: dict[int, torch.Tensor] = {}
    for gi in active:
        moments = [m for (h, _), m in stats.items() if h == gi]
        if moments:
            costs[gi] = torch.stack([_sq_dist(m) for m in moments]).sum(0)
            da, db = zip(*(m.constant() for m in moments))
            dead[gi] = torch.stack(da).all(0)[:, None] | torch.stack(db).all(0)[None, :]
    sa, sb = model_a.state_dict(), model_b.state_dict()
    by_key = spec.by_key()

    def solve(step, free_heads, cost_of) -> None:
        cs = [cost_of(gi) for gi in step]
        for gi, plan in zip(step, _plan_step([spec.groups[gi] for gi in step], cs, reg, free_heads)):
            plans[gi] = plan
            transforms[gi] = plan * spec.groups[gi].size

    def weights(gi: int) -> torch.Tensor:
        return _weight_cost(spec, gi, sa, sb, by_key, transforms)
    # groups read from activations first; then the capture-less ones from weights, given those maps
    steps = sorted(steps_of(spec, active), key=lambda s: any(gi not in costs for gi in s[0]))
    for step, free_heads in steps:
        solve(step, free_heads, lambda gi: costs[gi] if gi in costs else weights(gi))
    # units constant on the data (dead ReLUs) are equally far from every other dead unit: as activation
    # matching does, the weights (given every other group's map) break those ties, at a scale that cannot
    # outweigh any real difference in the activation cost
    for step, free_heads in steps:
        if not any(gi in dead and dead[gi].any() for gi in step):
            continue

        def tied(gi: int) -> torch.Tensor:
            if gi not in costs:
                return weights(gi)
            if not dead[gi].any():
                return costs[gi]
            w = weights(gi)
            scale = 1e-6 * max(float(costs[gi].max()), 1e-12) / max(float(w.max()), 1e-300)
            return costs[gi] + dead[gi] * w * scale
        solve(step, free_heads, tied)
    return TransportAlignment(spec, tuple(transforms), source=fingerprint(model_b), plans=tuple(plans), reg=reg)
