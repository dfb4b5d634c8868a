"""Appendix A.1: the closed forms against independent facts (scalar polynomials, the product they expand, the
recursion, the network's own forward pass)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vfnb import closed_form as cf
from vfnb.merge import interpolate
from vfnb.models import build_model


def _pair(**kw):
    torch.manual_seed(0)
    a = build_model("mlp", activation="none", **kw)
    torch.manual_seed(1)
    b = build_model("mlp", activation="none", **kw)
    return a, b


def test_e_k_of_scalars_is_the_classical_elementary_symmetric_polynomial():
    xs = [0.5, -1.2, 2.0, 0.3]
    coeffs = np.poly([-x for x in xs])  # prod (t + x_i) = sum_k e_k t^(N-k)
    mats = [torch.tensor([[x]], dtype=torch.float64) for x in xs]
    for k in range(len(xs) + 1):
        assert float(cf.elementary_symmetric(mats, k)) == pytest.approx(coeffs[k])


def test_e_k_orders_sum_to_the_ordered_product_and_satisfy_the_recursion():
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    product = torch.eye(3, dtype=torch.float64)
    for m in mats:
        product = (torch.eye(3, dtype=torch.float64) + m) @ product
    total = sum(cf.elementary_symmetric(mats, k) for k in range(5))
    assert torch.allclose(total, product)
    # e_k(M1..M_{N+1}) = M_{N+1} e_{k-1}(M1..M_N) + e_k(M1..M_N) (the paper prints e_{k-1} in the second term)
    for k in range(1, 5):
        lhs = cf.elementary_symmetric(mats, k)
        rhs = mats[-1] @ cf.elementary_symmetric(mats[:-1], k - 1) + cf.elementary_symmetric(mats[:-1], k)
        assert torch.allclose(lhs, rhs)
    assert torch.equal(cf.elementary_symmetric(mats, 0), torch.eye(3, dtype=torch.float64))
    assert torch.count_nonzero(cf.elementary_symmetric(mats, 5)) == 0
    # non-commuting: the later matrix stands on the left
    assert torch.allclose(cf.elementary_symmetric(mats[:2], 2), mats[1] @ mats[0])


@pytest.mark.parametrize("k", [-1, 1.5, True])
def test_e_k_refuses_bad_orders(k):
    with pytest.raises(ValueError, match="order k"):
        cf.elementary_symmetric([torch.eye(2)], k)


def test_eq_4_1_matches_the_forward_pass_at_every_layer():
    a, b = _pair(in_features=12, num_classes=4, depth=5, width=7)
    merged = interpolate(a, b, 0.3)
    x = torch.randn(20, 12)
    forms = cf.eq_4_1(cf.merged_layers(cf.linear_layers(a), cf.linear_layers(b), 0.3), x)
    zero = cf.forward_activations(merged, torch.zeros(1, 12))
    for c, f, f0 in zip(forms, cf.forward_activations(merged, x), zero):
        assert cf.relative_error(c.f, f) < 1e-5
        assert torch.allclose(c.h, f0[0], atol=1e-5)  # h = f(0)


@pytest.mark.parametrize("in_features", [6, 11], ids=["Prop. A.2", "Cor. A.3"])
def test_eq_5_2_matches_the_forward_pass_and_its_terms_add_up(in_features):
    a, b = _pair(in_features=in_features, num_classes=6, depth=4, width=6, residual=True)
    layers = cf.merged_layers(cf.linear_layers(a), cf.linear_layers(b), 0.5)
    x = torch.randn(15, in_features)
    forms = cf.eq_5_2(layers, x)
    forward = cf.forward_activations(interpolate(a, b, 0.5), x)
    assert len(forms) == 4
    for c, f in zip(forms, forward):
        assert cf.relative_error(c.f, f) < 1e-5
        assert torch.allclose(sum(c.terms), c.g)


def test_the_printed_corollary_drops_the_identity_path():
    a, b = _pair(in_features=9, num_classes=5, depth=4, width=5, residual=True)
    layers = cf.merged_layers(cf.linear_layers(a), cf.linear_layers(b), 0.5)
    x = torch.randn(10, 9)
    right, printed = cf.eq_5_2(layers, x), cf.eq_5_2(layers, x, printed_corollary=True)
    assert torch.allclose(right[0].f, printed[0].f)  # layer 1 has no sum
    for r, p in zip(right[1:], printed[1:]):
        assert torch.allclose(r.g - p.g, r.terms[0])  # exactly the e_0 term is missing: of W1 x ...
        assert torch.allclose(r.h - p.h, layers[0].bias)  # ... and of b1, both inside f^(1)(x)
    with pytest.raises(ValueError, match="Corollary A.3"):
        sq = cf.linear_layers(_pair(in_features=5, num_classes=5, depth=3, width=5, residual=True)[0])
        cf.eq_5_2(sq, torch.randn(2, 5), printed_corollary=True)


def test_closed_forms_refuse_what_they_do_not_cover():
    relu = build_model("mlp", in_features=4, num_classes=3, depth=3, width=4, activation="relu")
    with pytest.raises(TypeError, match="linear networks only"):
        cf.linear_layers(relu)
    with pytest.raises(TypeError, match="linear networks only"):
        cf.linear_layers(build_model("vgg11", width=0.0625))
    plain = cf.linear_layers(_pair(in_features=4, num_classes=4, depth=3, width=4)[0])
    res = cf.linear_layers(_pair(in_features=4, num_classes=4, depth=3, width=4, residual=True)[0])
    with pytest.raises(ValueError, match="without residual"):
        cf.eq_4_1(res, torch.randn(2, 4))
    with pytest.raises(ValueError, match="every layer"):
        cf.eq_5_2(plain, torch.randn(2, 4))
    with pytest.raises(ValueError, match="same depth"):
        cf.merged_layers(plain, plain[:2], 0.5)
    with pytest.raises(ValueError, match="features"):
        cf.eq_4_1(plain, torch.randn(2, 5))
    with pytest.raises(ValueError):
        cf.merged_layers(plain, plain, 1.5)


def test_e_k_cost_is_the_number_of_subsets():
    mats = [torch.eye(2, dtype=torch.float64) for _ in range(5)]
    for k in range(6):  # identity matrices: e_k = C(5, k) I
        n = sum(1 for _ in itertools.combinations(range(5), k))
        assert torch.allclose(cf.elementary_symmetric(mats, k), n * torch.eye(2, dtype=torch.float64))
