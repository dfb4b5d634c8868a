"""Closed forms of a merged linear network's activations (paper appendix A.1: Proposition A.1 = Eq. 4.1,
Proposition A.2 = Eq. 5.2, Corollary A.3), computed from the weights alone, never by running the network.

A linear network is a list of :class:`LinearLayer` ``(W, b, residual)``: layer l computes
``f⁽ˡ⁾ = W f⁽ˡ⁻¹⁾ + b`` and, when ``residual``, adds ``f⁽ˡ⁻¹⁾``. The merged network has
``W_α = (1−α)W₀ + αW₁`` and ``b_α = (1−α)b₀ + αb₁`` (:func:`merged_layers`).

- :func:`eq_4_1` (no residuals): ``g⁽ˡ⁾(x) = W⁽ˡ⁾···W⁽¹⁾x`` and ``h⁽ˡ⁾ = Σ_j W⁽ˡ⁾···W⁽ʲ⁺¹⁾ b⁽ʲ⁾``.
- :func:`eq_5_2` (a residual at every layer from ``start`` on): the feature is a sum of elementary symmetric
  polynomials, ``g⁽ˡ⁾(x) = Σ_k e_k(W⁽ˢ⁾, …, W⁽ˡ⁾) x'`` with ``x' = x`` (Prop. A.2, ``start=1``) or
  ``x' = W⁽¹⁾x``, the feature of ``f⁽¹⁾`` (Cor. A.3, ``start=2``; its bias ``b⁽¹⁾`` is carried into the offset),
  and ``h⁽ˡ⁾ = Σ_j Σ_k e_k(W⁽ʲ⁺¹⁾, …, W⁽ˡ⁾) b⁽ʲ⁾``.

:func:`elementary_symmetric` is the definition, ``e_k(M₁, …, M_N) = Σ_{j₁<…<j_k} M_{j_k}···M_{j₁}``, a sum over
all k-subsets with the later matrix on the left, as layers compose; it costs C(N, k) products, so it is limited
to :data:`MAX_FACTORS` matrices. (The recursion the paper's proof uses, ``e_k(M₁…M_{N+1}) = M_{N+1} e_{k−1}(M₁…M_N)
+ e_{k−1}(M₁…M_N)``, is misprinted: the last term is ``e_k(M₁…M_N)``; the tests check the corrected form.)
Everything runs in float64.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .validate import check_alpha


#: The most matrices :func:`elementary_symmetric` expands (all 2^N subsets of N = 16 are 65,536 products).
MAX_FACTORS = 16


@dataclass(frozen=True)
class LinearLayer:
    """One layer of a linear network: ``f ↦ W f + b (+ f if residual)``."""

    weight: torch.Tensor
    bias: torch.Tensor
    residual: bool


@dataclass
class ClosedForm:
    """One layer's closed form on inputs ``x`` (rows): the feature ``g`` and the offset ``h``, and for Eq. 5.2
    the feature's terms by order, ``terms[k] = e_k(…) x'`` (``sum(terms) == g``)."""

    g: torch.Tensor
    h: torch.Tensor
    terms: list[torch.Tensor] | None = None

    @property
    def f(self) -> torch.Tensor:
        """The activation ``f⁽ˡ⁾(x) = g⁽ˡ⁾(x) + h⁽ˡ⁾``."""
        return self.g + self.h


def linear_layers(model: nn.Module) -> list[LinearLayer]:
    """The layers of a linear :class:`vfnb.models.MLP` (``activation="none"``) as float64 ``(W, b, residual)``.

    Any other model is refused: the closed forms hold only for linear networks."""
    from .models import MLP
    if not isinstance(model, MLP) or not isinstance(model.act, nn.Identity):
        raise TypeError("the closed forms of appendix A.1 hold for linear networks only: pass a "
                        "vfnb MLP built with activation='none', e.g. build_model('mlp', activation='none')")
    out = []
    for layer, skip in zip(model.layers, model.skip):
        w = layer.weight.detach().to(torch.float64)
        b = (layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0])).to(torch.float64)
        out.append(LinearLayer(w, b, bool(skip)))
    return out


def merged_layers(layers_a: Sequence[LinearLayer], layers_b: Sequence[LinearLayer], alpha: float) -> list[LinearLayer]:
    """``W_α = (1−α)W₀ + αW₁`` and ``b_α = (1−α)b₀ + αb₁`` layer by layer (paper §3)."""
    check_alpha(alpha)
    if len(layers_a) != len(layers_b) or any(a.weight.shape != b.weight.shape or a.bias.shape != b.bias.shape
                                             or a.residual != b.residual
                                             for a, b in zip(layers_a, layers_b)):
        raise ValueError("merged_layers needs two networks of one architecture (same depth, shapes and residuals)")
    return [LinearLayer((1 - alpha) * a.weight + alpha * b.weight, (1 - alpha) * a.bias + alpha * b.bias, a.residual)
            for a, b in zip(layers_a, layers_b)]


def elementary_symmetric(mats: Sequence[torch.Tensor], k: int, dim: int | None = None) -> torch.Tensor:
    """``e_k(M₁, …, M_N) = Σ_{1≤j₁<…<j_k≤N} M_{j_k}···M_{j₁}`` by its definition (paper Prop. A.2); ``e₀ = I``
    and ``e_k = 0`` for ``k > N``. ``dim`` gives the size when ``mats`` is empty. Cost: C(N, k) products."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the order k of an elementary symmetric polynomial is an integer >= 0, got {k!r}")
    if len(mats) > MAX_FACTORS:
        raise ValueError(f"elementary_symmetric expands its definition over all subsets, which is too slow for "
                         f"{len(mats)} matrices (at most {MAX_FACTORS}); check a shallower network")
    if not mats and dim is None:
        raise ValueError("elementary_symmetric of no matrices needs dim= (the size of the identity e_0)")
    n = mats[0].shape[0] if mats else dim
    if any(m.shape != (n, n) for m in mats):
        raise ValueError(f"elementary_symmetric needs square matrices of one size, got {[tuple(m.shape) for m in mats]}")
    dtype = mats[0].dtype if mats else torch.float64
    total = torch.zeros(n, n, dtype=dtype)
    if k == 0:
        return torch.eye(n, dtype=dtype)
    for subset in itertools.combinations(range(len(mats)), k):
        prod = torch.eye(n, dtype=dtype)
        for j in subset:  # later matrices multiply from the left
            prod = mats[j] @ prod
        total += prod
    return total


def eq_4_1(layers: Sequence[LinearLayer], x: torch.Tensor) -> list[ClosedForm]:
    """Proposition A.1 (Eq. 4.1) at every layer: ``g⁽ˡ⁾(x) = W⁽ˡ⁾···W⁽¹⁾ x`` and ``h⁽ˡ⁾ = Σ_j W⁽ˡ⁾···W⁽ʲ⁺¹⁾ b⁽ʲ⁾``,
    each product formed explicitly. ``x`` holds one flattened input per row."""
    if any(layer.residual for layer in layers):
        raise ValueError("eq_4_1 is for networks without residual connections; use eq_5_2 for residual ones")
    x = _rows(x, layers)
    out = []
    for l in range(1, len(layers) + 1):
        g = x @ _product([layers[j].weight for j in range(l)]).T
        h = sum((_product([layers[k].weight for k in range(j + 1, l)], layers[j].bias.shape[0]) @ layers[j].bias
                 for j in range(l)), torch.zeros(layers[l - 1].weight.shape[0], dtype=torch.float64))
        out.append(ClosedForm(g, h))
    return out


def eq_5_2(layers: Sequence[LinearLayer], x: torch.Tensor, printed_corollary: bool = False) -> list[ClosedForm]:
    """Eq. 5.2 at every layer of a network with a residual connection at every layer (Proposition A.2) or at
    every layer but the first (Corollary A.3), as sums of elementary symmetric polynomials.

    Prop. A.2: ``g⁽ˡ⁾ = Σ_{k=0}^{l} e_k(W⁽¹⁾…W⁽ˡ⁾) x``; Cor. A.3: ``f⁽ˡ⁾ = Σ_{k=0}^{l−1} e_k(W⁽²⁾…W⁽ˡ⁾) f⁽¹⁾(x) + …``.
    The offset is ``h⁽ˡ⁾ = Σ_j Σ_k e_k(W⁽ʲ⁺¹⁾…W⁽ˡ⁾) b⁽ʲ⁾`` (with ``f⁽¹⁾``'s bias as the first term in Cor. A.3).
    ``printed_corollary=True`` sums Cor. A.3's feature over ``k = 1…l`` as the paper prints it, which
    drops ``e₀``, the identity path (the chapter shows the difference).
    """
    if not layers:
        raise ValueError("eq_5_2 needs at least one layer")
    start = 0 if layers[0].residual else 1
    square = [i + 1 for i, layer in enumerate(layers) if layer.residual and layer.weight.shape[0] != layer.weight.shape[1]]
    if square:
        raise ValueError(f"layer {square[0]} has a residual connection but a non-square weight; a residual needs "
                         "equal input and output widths")
    if any(not layer.residual for layer in layers[start:]):
        raise ValueError("eq_5_2 needs a residual connection at every layer (Prop. A.2) or at every layer but the "
                         "first (Cor. A.3); a plain layer later in the network has no Eq. 5.2 form")
    if printed_corollary and start == 0:
        raise ValueError("printed_corollary applies to Corollary A.3 (no residual at the first layer)")
    x = _rows(x, layers)
    out = []
    if start == 1:  # Cor. A.3: the first layer is plain, its output is the input of the residual part
        first = layers[0]
        g1, h1 = x @ first.weight.T, first.bias
        out.append(ClosedForm(g1, h1.clone(), [g1]))
        x, offsets = g1, [h1]
    else:
        offsets = []
    for l in range(start + 1, len(layers) + 1):
        ws = [layers[j].weight for j in range(start, l)]
        n = len(ws)
        orders = range(1, n + 1) if printed_corollary else range(0, n + 1)
        terms = [x @ elementary_symmetric(ws, k).T for k in orders]
        h = torch.zeros(ws[0].shape[0], dtype=torch.float64)
        # the bias of f^(1) (Cor. A.3) and of every residual layer j, carried through e_k of the layers after it;
        # as printed, the corollary's first sum (k = 1…l) also drops e_0 for f^(1)'s bias
        sources = [(start - 1, offsets[0], printed_corollary)] if start == 1 else []
        sources += [(j, layers[j].bias, False) for j in range(start, l)]
        for j, b, skip_e0 in sources:
            later = [layers[i].weight for i in range(j + 1, l)]
            h = h + sum((elementary_symmetric(later, k, dim=b.shape[0]) @ b for k in range(int(skip_e0), len(later) + 1)),
                        torch.zeros_like(b))
        out.append(ClosedForm(sum(terms), h, terms))
    return out


def forward_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The network's own forward pass truncated after each layer (float64): ``[f⁽¹⁾(x), …, f⁽ᴸ⁾(x)]`` of a
    :class:`vfnb.models.MLP`, including its residual additions."""
    linear_layers(model)  # refuses anything but a linear MLP
    m = copy.deepcopy(model).to(torch.float64).eval()
    outs = []
    with torch.no_grad():
        for l in range(1, len(model.layers) + 1):
            m.layers, m.skip = copy.deepcopy(model.layers[:l]).to(torch.float64), list(model.skip[:l])
            outs.append(m(x.to(torch.float64)))
    return outs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _product(mats: Sequence[torch.Tensor], dim: int | None = None) -> torch.Tensor:
    """``M_N···M₁`` (identity of size ``dim`` when empty)."""
    if not mats:
        return torch.eye(dim, dtype=torch.float64)
    prod = mats[0]
    for m in mats[1:]:
        prod = m @ prod
    return prod


def _rows(x: torch.Tensor, layers: Sequence[LinearLayer]) -> torch.Tensor:
    if not layers:
        raise ValueError("a closed form needs at least one layer")
    x = torch.flatten(torch.as_tensor(x), 1).to(torch.float64)
    if x.shape[1] != layers[0].weight.shape[1]:
        raise ValueError(f"inputs have {x.shape[1]} features but the first layer takes {layers[0].weight.shape[1]}")
    return x
