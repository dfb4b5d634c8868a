import numpy as np
import pytest
import torch

from vfnb import build_model, feature_bias, interpolate, upper_bound, vf_ratio
from vfnb.data import VisionData
from vfnb.diagnose import rescaled_features, weight_scale
from vfnb.structure import execution_order as layer_order


def tiny_data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return VisionData("mnist5k", images, torch.randint(0, 10, (n,), generator=g), (0.1307,), (0.3081,), 10)


def linear_pair():
    torch.manual_seed(0)
    a = build_model("mlp", depth=4, width=12, activation="none")
    torch.manual_seed(1)
    b = build_model("mlp", depth=4, width=12, activation="none")
    return a, b


def test_feature_bias_matches_closed_form_of_eq_4_1():
    a, b = linear_pair()
    alpha = 0.3
    merged = interpolate(a, b, alpha)
    data = tiny_data()
    fb = feature_bias(merged, data, batch_size=16)
    x = data.tensors()[0].flatten(1).double()
    Ws = [((1 - alpha) * la.weight + alpha * lb.weight).double().detach() for la, lb in zip(a.layers, b.layers)]
    bs = [((1 - alpha) * la.bias + alpha * lb.bias).double().detach() for la, lb in zip(a.layers, b.layers)]
    g = x.T
    h = torch.zeros(784, 1, dtype=torch.double)[:0]
    for l, (W, bias) in enumerate(zip(Ws, bs)):
        g = W @ g  # g^(l)(x) = prod_j W_alpha^(j) x
        h = bias[:, None] if l == 0 else W @ h + bias[:, None]  # h^(l) = sum_j prod_{k>j} W^(k) b^(j)
        d = g.shape[0]
        norms = g.norm(dim=0) / d ** 0.5
        assert fb.g_mean[l] == pytest.approx(norms.mean().item(), rel=1e-5)
        assert fb.g_std[l] == pytest.approx(norms.std(unbiased=False).item(), rel=1e-3, abs=1e-9)
        assert fb.h_norm[l] == pytest.approx((h.norm() / d ** 0.5).item(), rel=1e-5)
        f = g + h  # Var_x f = Var_x g: the offset does not vary with x
        assert fb.variance[l] == pytest.approx(f.var(dim=1, unbiased=True).mean().item(), rel=1e-5)
    assert fb.names == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_layer_order_follows_execution_not_definition():
    m = build_model("resnet20", norm="bn", width=0.25)
    order = layer_order(m, torch.zeros(1, 3, 32, 32))
    assert order[:3] == ["conv1", "norm1", "layer1.0.conv1"]
    assert order[-1] == "linear"
    # the shortcut of a downsampling block runs after the block's main path
    i = order.index("layer2.0.shortcut.0")
    assert order.index("layer2.0.norm2") < i


def test_rescaling_undoes_uniform_weight_shrinkage():
    torch.manual_seed(0)
    edge = build_model("mlp", depth=5, width=10, activation="none", bias=False)
    shrunk = build_model("mlp", depth=5, width=10, activation="none", bias=False)
    lam = 0.6
    with torch.no_grad():
        for le, ls in zip(edge.layers, shrunk.layers):
            ls.weight.copy_(lam * le.weight)
    data = tiny_data()
    fe, fs = feature_bias(edge, data), feature_bias(shrunk, data)
    np.testing.assert_allclose(fs.g_mean, fe.g_mean * lam ** fe.depth, rtol=1e-5)  # g -> λ^l g
    np.testing.assert_allclose(rescaled_features(fs, shrunk, [edge]), fe.g_mean, rtol=1e-5)
    np.testing.assert_allclose(vf_ratio(fs, [fe]), lam ** fe.depth, rtol=1e-5)
    assert np.isnan(weight_scale(shrunk)["bias"]).all()


def test_upper_bound_is_nonincreasing_dominates_and_follows_recursion():
    e = np.array([1.0, 0.2, 0.5, 0.1, 0.3])
    eps = upper_bound(e, gamma=1.4)
    assert np.all(eps >= e - 1e-12)
    assert np.all(np.diff(eps) <= 1e-12)
    L = len(e)
    assert eps[-1] == e[-1]
    for l in range(L - 1, 0, -1):  # 1-indexed l
        factor = 1.4 + (1 - 1.4) * (1 - 1 / (L - l + 1))
        assert eps[l - 1] == pytest.approx(max(e[l - 1], eps[l] * factor))
    # γ = 1 gives the plain running maximum from the back
    np.testing.assert_allclose(upper_bound(e, gamma=1.0), np.maximum.accumulate(e[::-1])[::-1])
    with pytest.raises(ValueError):
        upper_bound([], 1.4)


def test_feature_bias_errors():
    m = build_model("mlp", depth=2, width=4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_bias(m, tiny_data(1))
    with pytest.raises(ValueError, match="no conv, linear or norm"):
        layer_order(torch.nn.Sequential(torch.nn.ReLU()), torch.zeros(1, 3))
