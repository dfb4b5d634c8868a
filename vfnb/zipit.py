"""ZipIt! merging (Stoica et al., ICLR 2024) for sequential networks (paper §5.3, appendix A.8.2).

Where weight and activation matching *permute* model b onto model a, ZipIt! lets any two of the
2n features of a layer (n from each model) be merged, including two features of the same model.
At each merge point l it computes, from the features' correlations,

- a **merge matrix** ``M`` (n × 2n): row c averages the features of cluster c,
  f_α⁽ˡ⁾ = M [f_a⁽ˡ⁾; f_b⁽ˡ⁾] (paper appendix A.8.2), and
- an **unmerge matrix** ``U`` (2n × n, 0/1): ``U[m, c] = 1`` iff feature m is in cluster c, so
  [f_a; f_b] ≈ U f_α, and ``M U = I``.

A conv/linear layer is then zipped as W_α⁽ˡ⁾ = M_a⁽ˡ⁾ W_a⁽ˡ⁾ U_a⁽ˡ⁻¹⁾ + M_b⁽ˡ⁾ W_b⁽ˡ⁾ U_b⁽ˡ⁻¹⁾ (``M_a``,
``M_b``: the column halves of ``M``; ``U_a``, ``U_b``: the row halves of ``U``); biases and the
parameters/statistics of a BatchNorm/LayerNorm that follows the layer are merged with ``M`` only.
The input and the logits are never merged (``U⁽⁰⁾ = I``; the classifier's outputs are averaged
with the model weights). The merged model has the architecture of the edge models.

The matching (:func:`match_features`) is ZipIt!'s greedy algorithm. The vanishing-feature paper runs
ZipIt!'s original code (appendix A.3), whose defaults are α = 0.3 (``decay`` here) and β = 0.125. The two
hyperparameters are defined as in ZipIt! §4.3 and that code (``match_tensors_zipit``):

- **α (repeated matching)**: similarities are a correlation matrix C (2n × 2n) of the features,
  measured where ZipIt! measures them (after the nonlinearity). The pair of clusters with the
  highest similarity is merged. The merged cluster's similarity to every other cluster k becomes
  α · min(sim(p, k), sim(q, k)) (a merged feature stays available but decays by α for each merge
  it takes part in). α = 0 means a merged feature is never merged again.
- **β (same-model budget)**: at most ⌊β · ⌊n/2⌋⌋ merges per model and layer may join two clusters
  that hold features of that model only. β = 0 allows none (a pure cross-model matching);
  β = 1 allows ⌊n/2⌋ per model, so every merge of the layer may stay inside a model.

Merging stops when n clusters remain. (ZipIt!'s code labels a cluster by the model of its first member
when it counts within-model merges; here a merge counts as within-model only if every feature of both
clusters comes from one model.) Three choices that the ZipIt! paper leaves open are fixed here:

- a feature that is constant on the data has correlation 1 with another feature constant at the
  same value, 0 with everything else (ZipIt!'s code gives it 0 everywhere); so dead ReLU units pair
  with dead units, and zipping a model with itself reproduces it even when some units are dead;
- the budget is enforced before the first within-model merge (the reference code allows one
  within-model merge per model even at β = 0);
- ties (e.g. between dead units) go to a cross-model pair, then to the lowest index.

Interpolation: :meth:`Zip.merge` takes a weight w (the paper's α of θ_α). In cluster c, a feature of
model a gets weight (1−w), a feature of model b gets w, normalized over the cluster. At w = 0.5 this is
ZipIt!'s plain average. At w = 0 or 1, clusters formed only by the other model keep a plain average.
With within-model merges, w = 0 is therefore not model a itself.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .graph import Permutation, PermutationSpec, UnsupportedOperationError, permutation_spec
from .activations import JointMoments, collect_paired, peek
from .merge import bias_coefficients
from .structure import BN_TYPES, WEIGHT_TYPES, structure_of
from .validate import check_alpha, check_finite, check_same_architecture

__all__ = ["Zip", "ZipGroup", "zipit_matching", "match_features", "feature_correlation"]

def _check_unit(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------------
# Greedy matching on a correlation matrix.

@torch.no_grad()
def match_features(corr: torch.Tensor, decay: float = 0.3, beta: float = 0.125) -> tuple[torch.Tensor, dict]:
    """ZipIt!'s greedy feature matching (ZipIt! §4.3; see the module docstring for α and β). ZipIt!'s α is
    called ``decay`` here, so that it is never confused with the merging coefficient α.

    ``corr`` is the (2n × 2n) similarity of the features ``[f_a; f_b]`` (rows 0..n−1 model a).
    Returns the unmerge matrix ``U`` (2n × n, 0/1; column c lists the members of cluster c; clusters
    are ordered by their first member) and counts: ``cross`` / ``within_a`` / ``within_b`` merges,
    ``forced`` merges that broke the α/β rules because no allowed pair was left (only possible
    for α = 0), and ``mean_similarity`` of the merged pairs.
    """
    decay, beta = _check_unit("decay", decay), _check_unit("beta", beta)
    if not isinstance(corr, torch.Tensor) or corr.dim() != 2 or corr.shape[0] != corr.shape[1] \
            or corr.shape[0] % 2 or corr.shape[0] == 0:
        raise ValueError(f"corr must be a square 2n × 2n tensor, got shape {tuple(getattr(corr, 'shape', ()))}")
    if torch.isnan(corr).any():
        raise ValueError("corr contains NaN; compute it with feature_correlation (zero-variance safe)")
    two_n = corr.shape[0]
    n = two_n // 2
    link = corr.detach().to("cpu", torch.float64).clone()
    link.fill_diagonal_(-math.inf)
    alive = torch.ones(two_n, dtype=torch.bool)
    frozen = torch.zeros(two_n, dtype=torch.bool)  # merged once, with α = 0
    pure = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])  # -1: mixed
    members: list[list[int]] = [[i] for i in range(two_n)]
    budget = [int(beta * (n // 2) + 1e-9)] * 2
    counts = {"cross": 0, "within_a": 0, "within_b": 0, "forced": 0}
    total_sim = 0.0
    eye = torch.eye(two_n, dtype=torch.bool)
    for _ in range(n):
        ok = alive & ~frozen
        allowed = ok[:, None] & ok[None, :] & ~eye
        for m in (0, 1):
            if budget[m] <= 0:
                pm = pure == m
                allowed &= ~(pm[:, None] & pm[None, :])
        score = link.masked_fill(~allowed, -math.inf)
        best = _best(score, pure)
        if score.view(-1)[best] == -math.inf:  # nothing allowed is left: merge the most similar live pair
            counts["forced"] += 1
            score = link.masked_fill(~(alive[:, None] & alive[None, :] & ~eye), -math.inf)
            best = _best(score, pure)
        p, q = divmod(best, two_n)
        p, q = min(p, q), max(p, q)
        total_sim += float(link[p, q])
        if pure[p] == pure[q] and pure[p] >= 0:
            m = int(pure[p])
            counts["within_a" if m == 0 else "within_b"] += 1
            budget[m] -= 1
        else:
            counts["cross"] += 1
            pure[p] = -1
        row = torch.minimum(link[p], link[q])
        if decay > 0:
            row = row * decay
        else:
            frozen[p] = True
        link[p], link[:, p] = row, row
        link[p, p] = -math.inf
        link[q], link[:, q] = -math.inf, -math.inf
        alive[q] = False
        members[p] += members[q]
        members[q] = []
    clusters = [sorted(c) for c in members if c]
    U = torch.zeros(two_n, n, dtype=torch.float64)
    for c, mem in enumerate(clusters):
        U[mem, c] = 1.0
    counts["mean_similarity"] = total_sim / max(n, 1)
    if counts["forced"]:
        warnings.warn(f"ZipIt!: {counts['forced']} of {n} merges broke the α/β rules (no allowed pair was "
                      "left); use decay > 0 or a larger beta", stacklevel=2)
    return U, counts


def _best(score: torch.Tensor, pure: torch.Tensor) -> int:
    """Flat index of the highest score; ties go to a cross-model pair, then to the lowest index."""
    top = score.max()
    ties = score == top
    if int(ties.sum()) > 2:  # more than one (symmetric) pair
        within = (pure[:, None] == pure[None, :]) & (pure[:, None] >= 0)
        cross_ties = ties & ~within
        if bool(cross_ties.any()):
            ties = cross_ties
    return int(ties.view(-1).nonzero()[0])


def merge_matrix(U: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """The merge matrix ``M`` (n × 2n) of an unmerge matrix at interpolation weight ``weight``.

    Row c averages the members of cluster c with weight (1−w) for a feature of model a and w for
    one of model b, normalized over the cluster (a plain average where these weights sum to 0).
    ``M @ U`` is the identity.
    """
    w = check_alpha(weight)
    two_n, n = U.shape
    omega = torch.cat([torch.full((two_n // 2,), 1.0 - w, dtype=U.dtype), torch.full((two_n // 2,), w, dtype=U.dtype)])
    A = U.T * omega[None, :]
    total = A.sum(1, keepdim=True)
    plain = U.T / U.T.sum(1, keepdim=True)
    return torch.where(total > 0, A / total.clamp_min(1e-300), plain)


# ---------------------------------------------------------------------------------------------------
# Correlations of the 2n features, in one streaming pass.

def _correlation(n: int, s: torch.Tensor, ss: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 rtol: float = 1e-9) -> torch.Tensor:
    """Pearson correlation from sums; features constant on the data (max − min ≤ rtol·scale) get 1
    with features constant at the same value and 0 with everything else."""
    n = max(n, 1)
    mean = s / n
    cov = ss / n - torch.outer(mean, mean)
    var = cov.diagonal().clamp_min(0)
    scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
    const = (hi - lo) <= rtol * scale
    std = var.sqrt()
    denom = torch.outer(std, std)
    corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).clamp(-1.0, 1.0)
    either = const[:, None] | const[None, :]
    same_const = const[:, None] & const[None, :] & ((mean[:, None] - mean[None, :]).abs()
                                                    <= rtol * torch.maximum(scale[:, None], scale[None, :]))
    corr = torch.where(either, same_const.to(corr.dtype), corr)
    return corr.cpu()


def _check_sequential(spec: PermutationSpec, model: nn.Module) -> None:
    modules = dict(model.named_modules())
    spec.check_in_order("ZipIt!")
    for g in spec.groups:
        if len(g.producers) != 1:
            raise UnsupportedOperationError(
                f"ZipIt! here supports sequential networks only (MLP, VGG with or without norms): the outputs of "
                f"{', '.join(g.producers)} are added together, i.e. the model has residual connections "
                f"({type(model).__name__}). Use weight or activation matching for residual networks")
        layer = modules[g.producers[0]]
        if not isinstance(layer, WEIGHT_TYPES):
            raise UnsupportedOperationError(f"ZipIt! cannot zip {g.producers[0]!r} ({type(layer).__name__}); "
                                            "only Conv1d/2d/3d and Linear layers are supported")
        if getattr(layer, "groups", 1) != 1:
            raise UnsupportedOperationError(f"ZipIt! cannot zip the grouped convolution {g.producers[0]!r} "
                                            f"(groups={layer.groups})")
        if not g.captures:
            raise UnsupportedOperationError(f"no activation of the outputs of {g.producers[0]!r} is read; "
                                            "nothing to correlate")


@torch.no_grad()
def feature_correlation(model_a: nn.Module, model_b: nn.Module, data: Any, spec: PermutationSpec,
                        batch_size: int = 500, max_batches: int | None = None) -> list[torch.Tensor]:
    """Per group of ``spec``: the (2n × 2n) correlation of ``[f_a; f_b]`` at the group's capture points
    (after the nonlinearity; averaged over capture points), from one streaming pass over ``data``.

    Every spatial position of a conv map counts as a sample (N×H×W), as in activation matching.
    """
    first, stream = peek(data, batch_size, model_a, "ZipIt! matching")
    stats = collect_paired(model_a, model_b, spec, [g.index for g in spec.groups], stream,
                           JointMoments, max_batches)
    out = []
    for g in spec.groups:
        corrs = [_correlation(m.n, m.s, m.ss, m.lo, m.hi) for (gi, _), m in stats.items() if gi == g.index]
        out.append(torch.stack(corrs).mean(0))
    return out


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZipGroup:
    """One merge point: the outputs of conv/linear ``layer`` (``size`` = n units per model).

    ``unmerge`` is ``U`` (2n × n); ``counts`` holds the number of cross-model and within-model merges.
    """
    index: int
    layer: str
    size: int
    unmerge: torch.Tensor
    counts: dict

    def merge(self, weight: float = 0.5) -> torch.Tensor:
        """``M`` (n × 2n) at interpolation weight ``weight`` (0.5: ZipIt!'s average)."""
        return merge_matrix(self.unmerge, weight)


@dataclass(eq=False)
class Zip:
    """The result of :func:`zipit_matching`: one :class:`ZipGroup` per merge point of ``spec``."""
    spec: PermutationSpec
    groups: tuple[ZipGroup, ...]
    decay: float
    beta: float

    @property
    def layers(self) -> dict[str, ZipGroup]:
        """conv/linear module name → the group that merges its outputs."""
        return {g.layer: g for g in self.groups}

    def merge_matrices(self, weight: float = 0.5) -> list[torch.Tensor]:
        """``M`` per group (n × 2n)."""
        return [g.merge(weight) for g in self.groups]

    def unmerge_matrices(self) -> list[torch.Tensor]:
        """``U`` per group (2n × n)."""
        return [g.unmerge for g in self.groups]

    def summary(self) -> list[dict[str, Any]]:
        """Per merge point: layer, n, cross-model merges, within-model merges per model, clusters of
        more than two features, and the mean similarity of the merged pairs."""
        rows = []
        for g in self.groups:
            sizes = g.unmerge.sum(0)
            rows.append({"layer": g.layer, "n": g.size, "cross": g.counts["cross"], "within a": g.counts["within_a"],
                         "within b": g.counts["within_b"], "clusters > 2": int((sizes > 2).sum()),
                         "mean similarity": round(g.counts["mean_similarity"], 4)})
        return rows

    def as_permutation(self) -> Permutation:
        """The permutation of model b that this zip amounts to, if every cluster is one feature of
        model a and one of model b (e.g. β = 0 on models that are permutations of each other).

        Then ``merge(a, b, w)`` equals ``interpolate(a, apply_permutation(b, perm), w)``.
        """
        perms = []
        for g in self.groups:
            n = g.size
            ua, ub = g.unmerge[:n], g.unmerge[n:]
            if not (torch.all(ua.sum(0) == 1) and torch.all(ub.sum(0) == 1)):
                raise ValueError(f"the zip of {g.layer!r} is not a permutation: {g.counts['within_a']} + "
                                 f"{g.counts['within_b']} within-model merges, {int((g.unmerge.sum(0) > 2).sum())} "
                                 "clusters of more than two features")
            # cluster c holds a-feature i and b-feature j: new unit i of the permuted b is old unit j
            perm = torch.empty(n, dtype=torch.long)
            perm[ua.argmax(0)] = ub.argmax(0)
            perms.append(perm)
        return Permutation(self.spec, tuple(perms))

    @torch.no_grad()
    def merge(self, model_a: nn.Module, model_b: nn.Module, weight: float = 0.5,
              bias_calibration: bool = False) -> nn.Module:
        """The zipped model (same architecture as the edges) at interpolation weight ``weight``.

        W_α = M_a W_a U_a + M_b W_b U_b for every conv/linear weight (``U = I`` at the input; the logits are
        averaged with weights (1−w, w)); biases and norm parameters/statistics follow ``M``.
        Integer buffers come from ``model_a``. ``model_a``/``model_b`` are left untouched.

        ``bias_calibration=True`` applies the paper's bias calibration (§5.3) to the zip: the bias of the
        l-th conv/linear layer (1-based) takes each model's share times that model's weight to the power
        l−1, b_α⁽ˡ⁾ = (1−w)^(l−1)·M_a b_a + w^(l−1)·M_b b_b, which for a cross-model pair is
        (1−w)^l·b_a + w^l·b_b, the paper's formula. Refused for BatchNorm models, as in
        :func:`vfnb.normalize.calibrate_bias`.
        """
        w = check_alpha(weight)
        check_same_architecture(model_a, model_b)
        self.spec.check_model(model_a)
        depth: dict[str, int] = {}
        if bias_calibration:
            if any(isinstance(m, BN_TYPES) for m in model_a.modules()):
                raise ValueError("bias calibration refuses BatchNorm models: their running statistics belong to the "
                                 "un-calibrated layers; use RESET for BatchNorm models")
            # one depth per layer, as merge.interpolate counts them (structure.Structure.depth)
            depth = {f"{name}.bias": d for name, d in structure_of(model_a).depth.items()}
        mats = {g.index: (g.merge(w), g.unmerge) for g in self.groups}
        by_key = self.spec.by_key()
        sa, sb = model_a.state_dict(), model_b.state_dict()
        state = {}
        for key, va in sa.items():
            if not va.is_floating_point():
                state[key] = va.clone()
                continue
            entries = by_key.get(key, [])
            out = None
            for i, t in enumerate((va, sb[key])):
                t = t.detach().to("cpu", torch.float64)
                scaled = False
                for gi, e in entries:
                    M, U = mats[gi]
                    n = U.shape[1]
                    if e.axis == 1:  # the inputs of a conv/linear: unmerge
                        t = _contract(t, e.axis, e.block, U[i * n:(i + 1) * n].T)
                    else:  # outputs of a layer (and its norm): merge
                        t = _contract(t, e.axis, e.block, M[:, i * n:(i + 1) * n])
                        scaled = True
                if not scaled:
                    t = t * (1.0 - w if i == 0 else w)
                if key in depth:
                    t = t * bias_coefficients(w, depth[key] - 1)[i]  # M carries one factor of the weight
                out = t if out is None else out + t
            state[key] = out.to(va.dtype).to(va.device)
        merged = copy.deepcopy(model_a)
        merged.load_state_dict(state)
        return merged.eval()

    def target_stats(self, stats_a: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     stats_b: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     weight: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """REPAIR/RESCALE targets (paper Eq. 2) for the zipped model's channels.

        ``stats_a``/``stats_b`` are :func:`vfnb.normalize.layer_stats` of the two edge models (per
        conv/linear name: per-channel mean and std of the pre-activation). A merged channel's target
        is the cluster's weighted average, ``M(w) [mean_a; mean_b]`` and ``M(w) [std_a; std_b]`` (for a
        cross pair: (1−w)·stat_a + w·stat_b); a layer whose outputs are not merged (the classifier)
        gets (1−w)·stat_a + w·stat_b. Pass the result as ``targets=`` to ``vfnb.normalize.repair``.
        """
        w = check_alpha(weight)
        missing = sorted(set(stats_a) ^ set(stats_b))
        if missing:
            raise ValueError(f"stats_a and stats_b must cover the same layers; differing: {missing[:5]}")
        layers, out = self.layers, {}
        for name, (ma, sa_) in stats_a.items():
            mb, sb_ = stats_b[name]
            if not (ma.shape == sa_.shape == mb.shape == sb_.shape and ma.dim() == 1):
                raise ValueError(f"stats of {name!r} must be two 1-D tensors of one length per model")
            g = layers.get(name)
            if g is None:
                out[name] = (torch.lerp(ma.double(), mb.double(), w).to(ma.dtype),
                             torch.lerp(sa_.double(), sb_.double(), w).to(sa_.dtype))
                continue
            if ma.shape[0] != g.size:
                raise ValueError(f"stats of {name!r} have {ma.shape[0]} channels, but the zip merges {g.size}")
            M = g.merge(w)
            mean = M @ torch.cat([ma, mb]).detach().cpu().double()
            std = M @ torch.cat([sa_, sb_]).detach().cpu().double()
            out[name] = (mean.to(ma.dtype).to(ma.device), std.to(sa_.dtype).to(sa_.device))
        return out

    def __repr__(self) -> str:
        cross = sum(g.counts["cross"] for g in self.groups)
        within = sum(g.counts["within_a"] + g.counts["within_b"] for g in self.groups)
        return (f"Zip({self.spec.model_type}, {len(self.groups)} merge points, {cross} cross-model and {within} "
                f"within-model merges, decay={self.decay}, beta={self.beta})")


def _contract(t: torch.Tensor, axis: int, block: int, A: torch.Tensor) -> torch.Tensor:
    """Apply ``A`` (new × old units) to ``axis`` of ``t``, whose units are blocks of ``block`` entries."""
    moved = t.movedim(axis, 0)
    rest = moved.shape[1:]
    old = moved.shape[0] // block
    if A.shape[1] != old:
        raise ValueError(f"internal: {A.shape[1]} units expected on axis {axis}, found {old}")
    x = moved.reshape(old, -1)
    y = (A.to(x.dtype) @ x).reshape(A.shape[0] * block, *rest)
    return y.movedim(0, axis)


@torch.no_grad()
def zipit_matching(model_a: nn.Module, model_b: nn.Module, data: Any, example_input: torch.Tensor | None = None,
                   decay: float = 0.3, beta: float = 0.125, batch_size: int = 500,
                   max_batches: int | None = None) -> Zip:
    """ZipIt! (Stoica et al. 2024; paper §5.3, appendix A.8.2): merge/unmerge matrices for every layer.

    Features are the outputs of each conv/linear layer after its norm and nonlinearity; their
    2n × 2n correlation is accumulated in float64 in one streaming pass over ``data`` (a VisionData
    read without augmentation, a tensor, or an iterable of batches), then matched greedily by
    :func:`match_features` with ZipIt!'s α (``decay``: decay of a merged feature's similarities) and β
    (same-model budget). Only sequential networks (MLP without residuals, VGG with or without
    norms) are supported: residual connections raise :class:`~vfnb.graph.UnsupportedOperationError`.
    Build the merged model with :meth:`Zip.merge`.
    """
    decay, beta = _check_unit("decay", decay), _check_unit("beta", beta)
    check_same_architecture(model_a, model_b)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    first, stream = peek(data, batch_size, model_a, "ZipIt! matching")
    spec = permutation_spec(model_a, first[:2] if example_input is None else example_input)
    _check_sequential(spec, model_a)
    corrs = feature_correlation(model_a, model_b, stream, spec, batch_size=batch_size,
                                max_batches=max_batches)
    groups = []
    for g, c in zip(spec.groups, corrs):
        U, counts = match_features(c, decay, beta)
        groups.append(ZipGroup(g.index, g.producers[0], g.size, U, counts))
    return Zip(spec, tuple(groups), decay, beta)
