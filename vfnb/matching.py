"""Aligning two networks modulo permutation: weight matching and activation matching
(paper §2 "model merging"; ARCHITECTURE.md "Permutations"; Ainsworth et al. 2023, Git Re-Basin).

Both return the :class:`~vfnb.graph.Permutation` that, applied to ``model_b`` with
:func:`~vfnb.graph.apply_permutation`, aligns it to ``model_a``. ``layers=l`` restricts matching to the
groups of the first ``l`` layers (a group's depth is the deepest layer whose outputs it permutes);
every other group keeps the identity (paper Fig. 4 left, "permute only the first l layers").
"""
from __future__ import annotations


import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .activations import CrossMoments, collect_paired, peek
from .graph import (Entry, Permutation, active_groups, identity_permutation, permutation_spec,
                    permute_tensor)
from .validate import check_finite, check_same_architecture

__all__ = ["weight_matching", "activation_matching"]


def _unfold(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``[size, -1]``: unit ``i`` of ``axis`` (with its block) as row ``i``."""
    return t.movedim(axis, 0).reshape(size, -1)


def _solve(S: torch.Tensor) -> torch.Tensor:
    _, col = linear_sum_assignment(S.numpy(), maximize=True)
    return torch.from_numpy(col).long()


def _pair_layout(w: torch.Tensor, e: Entry, f: Entry, size: int) -> torch.Tensor:
    """``w`` as ``[units on e.axis, units on f.axis, rest]`` (blocks and other axes in ``rest``)."""
    moved = w.movedim((e.axis, f.axis), (0, 1))
    n = moved.shape[1] // f.block
    return moved.reshape(size, e.block, n, f.block, *moved.shape[2:]).transpose(1, 2).reshape(size, n, -1)


class _Term:
    """One tensor axis's share ``unfold(W_a, p) · unfold(π(W_b), p)ᵀ`` of a group's similarity matrix.

    With one other permuted axis ``q`` (the usual case: a weight's in/out axes), the tensors are kept
    as ``[units on p, units on q, rest]`` and the term is updated incrementally over the units of ``q``
    whose permutation changed since the last call: exact, and much cheaper once the descent settles.
    """

    def __init__(self, wa: torch.Tensor, wb: torch.Tensor, e: Entry, size: int,
                 others: list[tuple[int, Entry]]) -> None:
        self.others, self.value, self.seen = others, None, None
        if len(others) == 1:
            self.a, self.b = _pair_layout(wa, e, others[0][1], size), _pair_layout(wb, e, others[0][1], size)
        else:
            self.a, self.b, self.e, self.size = _unfold(wa, e.axis, size), wb, e, size

    def __call__(self, perms: list[torch.Tensor]) -> torch.Tensor:
        if not self.others:
            if self.value is None:
                self.value = self.a @ _unfold(self.b, self.e.axis, self.size).T
            return self.value
        if len(self.others) > 1:
            b = permute_tensor(self.b, self.others, perms)
            return self.a @ _unfold(b, self.e.axis, self.size).T
        cur, old = perms[self.others[0][0]], self.seen
        n = self.a.shape[0]
        if self.value is None or (changed := (cur != old).nonzero().flatten()).numel() > cur.numel() // 2:
            self.value = self.a.reshape(n, -1) @ self.b.index_select(1, cur).reshape(n, -1).T
        elif changed.numel():
            delta = self.b.index_select(1, cur[changed]) - self.b.index_select(1, old[changed])
            self.value += self.a.index_select(1, changed).reshape(n, -1) @ delta.reshape(n, -1).T
        self.seen = cur
        return self.value


def weight_matching(model_a: nn.Module, model_b: nn.Module, example_input: torch.Tensor, seed: int = 0,
                    max_iter: int = 100, layers: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Permutation:
    """Permutation of ``model_b`` maximizing Σ ⟨W_a, π(W_b)⟩ over every permuted tensor (Git Re-Basin).

    Coordinate descent: each sweep visits the groups in a random order
    (``numpy.random.default_rng(seed)``); for group ``g`` it solves the linear assignment of
    ``S = Σ_{(W, axis) ∈ g} unfold(W_a, axis) · unfold(π_{-g}(W_b), axis)ᵀ``, where ``π_{-g}`` applies the
    current permutations of the other groups. A new permutation is taken only if it strictly
    improves ``Σ_i S[i, π(i)]``; the descent stops after a sweep that changes nothing (or ``max_iter``
    sweeps). A group none of whose neighbours changed since it was last solved is skipped (its
    problem is unchanged), and each term of ``S`` is updated only over the units that moved.

    ``S`` is computed in ``dtype`` (float32 by default: about 1.5-2x faster than float64 here, with the
    same permutations on the benchmark pair); an "improvement" must then exceed the float32 rounding
    level (1e-6 relative). Pass ``torch.float64`` for exact ties-sensitive work.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    spec = permutation_spec(model_a, example_input)
    active = active_groups(spec, layers)
    by_key = spec.by_key()
    sa, sb = model_a.state_dict(), model_b.state_dict()
    terms: dict[int, list[_Term]] = {}
    for gi in active:
        g = spec.groups[gi]
        terms[gi] = [_Term(sa[e.key].detach().to("cpu", dtype), sb[e.key].detach().to("cpu", dtype),
                           e, g.size, [(h, f) for h, f in by_key[e.key] if f.axis != e.axis]) for e in g.entries]
    deps = {gi: {h for t in terms[gi] for h, _ in t.others} for gi in active}
    perms = list(identity_permutation(spec).perms)
    solved_at, changed_at = [-1] * len(perms), [-1] * len(perms)
    rng, step = np.random.default_rng(seed), 0
    for _ in range(max_iter):
        changed = False
        for gi in rng.permutation(active).tolist() if active else []:
            step += 1
            if solved_at[gi] >= 0 and all(changed_at[h] < solved_at[gi] for h in deps[gi]):
                continue  # same assignment problem as last time
            S = sum(t(perms) for t in terms[gi])
            new, rows = _solve(S), torch.arange(len(S))
            solved_at[gi] = step
            old_score = S[rows, perms[gi]].double().sum().item()
            new_score = S[rows, new].double().sum().item()
            if new_score > old_score + tol * max(1.0, abs(old_score)):
                perms[gi], changed_at[gi], changed = new, step, True
        if not changed:
            break
    return Permutation(spec, tuple(perms))


@torch.no_grad()
def activation_matching(model_a: nn.Module, model_b: nn.Module, data, example_input: torch.Tensor | None = None,
                        layers: int | None = None, batch_size: int = 500,
                        max_batches: int | None = None) -> Permutation:
    """Permutation of ``model_b`` maximizing the correlation of its activations with ``model_a``'s.

    One streaming pass over ``data`` (a VisionData, read without augmentation; or a tensor / iterable
    of batches) in eval mode. Each group is aligned where its units are produced, after the
    nonlinearity (Git Re-Basin): the outputs of the element-wise activations that carry the group
    (``Group.captures``). For a conv → norm → ReLU chain that is the ReLU output; for a residual
    stream it is every activated point of the stream (the stem's ReLU and each block's final
    ReLU after the addition); a group with no nonlinearity (linear MLP) is aligned on the values
    its consumers read. Conv maps count every position as a sample (N×H×W). Exact Pearson
    correlations are accumulated in float64 per capture point; the group's matrix is their sum,
    and ``linear_sum_assignment(maximize=True)`` solves it. Zero-variance units get an epsilon in
    the denominator, so their correlations are 0, never NaN.
    """
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    first, stream = peek(data, batch_size, model_a, "activation matching")
    spec = permutation_spec(model_a, first[:2] if example_input is None else example_input)
    active = active_groups(spec, layers)
    stats = collect_paired(model_a, model_b, spec, active, stream, CrossMoments, max_batches)
    perms = list(identity_permutation(spec).perms)
    for gi in active:
        corrs = [m.corr() for (h, _), m in stats.items() if h == gi]
        if corrs:  # a group with no activation (dead code) keeps the identity
            perms[gi] = _solve(torch.stack(corrs).sum(0))
    return Permutation(spec, tuple(perms))
