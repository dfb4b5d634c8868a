"""Vanishing-feature curve, output logits and BatchNorm statistics (vfnb.diagnose §5 additions) and
their figures."""
import copy

import numpy as np
import pytest
import torch

from vfnb import build_model, feature_bias
from vfnb.data import VisionData
from vfnb.diagnose import LogitStats, VFCurve, bn_stats, logit_stats, vf_curve
from vfnb.normalize import reset_bn_stats
from vfnb.plots import figure, plot_bn_stats, plot_logits, plot_vf_curves


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return VisionData("mnist5k", images, torch.randint(0, 10, (n,), generator=g), (0.1307,), (0.3081,), 10)


def mlp(seed, **kw):
    torch.manual_seed(seed)
    return build_model("mlp", **{"depth": 4, "width": 12, "activation": "none", **kw}).eval()


def test_own_reference_gives_ratio_one_and_a_valid_bound():
    torch.manual_seed(0)
    m = build_model("vgg11", width=0.0625, in_channels=1, input_size=28, norm="ln").eval()
    data = tiny_data()
    c = vf_curve(m, [m], data, batch_size=16)
    assert isinstance(c, VFCurve)
    np.testing.assert_allclose(c.ratio, 1.0, rtol=1e-9)
    assert np.all(np.diff(c.bound) <= 1e-12) and np.all(c.bound >= c.ratio - 1e-12)
    assert c.relative_depth[-1] == 1.0 and len(c.layers) == len(c.ratio) == len(c.bound)
    assert c.layers[0] == "features.0" and c.layers[-1] == "classifier"


def test_ratio_of_a_scaled_linear_network_is_the_product_of_scales():
    """Bias-free linear net with every weight scaled by c: g⁽ˡ⁾ scales by c^l exactly."""
    a = mlp(0, bias=False)
    scaled = copy.deepcopy(a)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(0.5)
    data = tiny_data()
    c = vf_curve(scaled, [feature_bias(a, data)], data)
    np.testing.assert_allclose(c.ratio, 0.5 ** np.arange(1, 5), rtol=1e-6)
    assert c.vanishes(threshold=0.1) and not c.vanishes(threshold=0.01)
    # a model reference and its precomputed FeatureBias give the same curve
    np.testing.assert_allclose(vf_curve(scaled, [a], data).bound, c.bound)


def test_vf_curve_rejects_bad_references():
    a, data = mlp(0), tiny_data()
    with pytest.raises(ValueError, match="at least one reference"):
        vf_curve(a, [], data)
    with pytest.raises(TypeError, match="models or FeatureBias"):
        vf_curve(a, ["edge"], data)
    with pytest.raises(ValueError, match="reference layers differ"):
        vf_curve(a, [feature_bias(mlp(1, depth=3), data)], data)


def test_logit_stats_match_a_direct_computation():
    m, data = mlp(0), tiny_data()
    s = logit_stats(m, data, batch_size=7)
    x = data.tensors()[0]
    with torch.no_grad():
        out = m(x).double()
        zero = m(torch.zeros(1, 1, 28, 28))[0].double()
    np.testing.assert_allclose(s.mean, out.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.std, out.std(0, unbiased=False).numpy(), rtol=1e-5)
    np.testing.assert_allclose(s.zero, zero.numpy(), rtol=1e-6)
    # no bias: the offset f(0) vanishes
    assert np.abs(logit_stats(mlp(0, bias=False), data).zero).max() == 0
    assert s.offset_ratio > 0


def test_bn_stats_before_and_after_reset():
    torch.manual_seed(0)
    m = build_model("resnet20", width=0.25, in_channels=1, input_size=28, norm="bn").eval()
    before = bn_stats(m)
    assert len(before) == 21  # 19 norms on the main path + 2 shortcut norms
    assert all(np.allclose(mu, 0) and np.allclose(sd, 1) for mu, sd in before.values())  # fresh BN
    after = bn_stats(reset_bn_stats(m, tiny_data()))
    assert list(after) == list(before)
    assert not np.allclose(after["norm1"][1], 1)
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_stats(mlp(0))


def test_figures_draw():
    data = tiny_data()
    a, b = mlp(0), mlp(1)
    ca, cb = vf_curve(a, [a, b], data), vf_curve(b, [a, b], data)
    fig, axes = figure(3)
    plot_vf_curves(axes[0], {"a": ca, "b": cb})
    assert len(axes[0].lines) == 5  # 2 bounds + 2 ratios + the reference line
    plot_logits(axes[1], {"a": logit_stats(a, data), "b": logit_stats(b, data)}, std_scale=0.1)
    torch.manual_seed(0)
    bn = build_model("vgg11", width=0.0625, in_channels=1, input_size=28, norm="bn").eval()
    plot_bn_stats(axes[2], bn_stats(bn), bn_stats(reset_bn_stats(bn, data)))
    assert len(axes[2].lines) == 4
    fig2, pair = figure(2)
    plot_bn_stats(pair, bn_stats(bn), bn_stats(reset_bn_stats(bn, data)))
    assert len(pair[0].lines) == len(pair[1].lines) == 2
    assert fig._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="same BatchNorm"):
        plot_bn_stats(axes[2], bn_stats(bn), {})
    with pytest.raises(ValueError):
        plot_logits(axes[1], {})
    assert isinstance(logit_stats(a, data), LogitStats)


def test_scaling_matrix_statistics():
    from vfnb.diagnose import scaling_matrix
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    same = scaling_matrix(w, w)
    assert same["sign agreement"] == 1.0 and same["midpoint scale"] == pytest.approx(1.0)
    assert same["median W0/W1"] == pytest.approx(1.0)
    opposite = scaling_matrix(w, -w)
    assert opposite["sign agreement"] == 0.0 and opposite["midpoint scale"] == pytest.approx(0.0, abs=1e-12)
    other = scaling_matrix(w, torch.randn(64, 32, generator=torch.Generator().manual_seed(1)))
    assert other["sign agreement"] == pytest.approx(0.5, abs=0.05)
    assert other["midpoint scale"] == pytest.approx(2 ** -0.5, abs=0.05)


def test_vanishing_experiments_reuse_the_merging_edge_models():
    """The §5 chapters' cpu edge models are exactly the zoo entries of the §2 chapter (no retraining)."""
    import vfnb
    from vfnb.chapters.common import ARCHS, arch_cfg, edge_configs
    merging = vfnb.resolve("preliminaries", "cpu")
    for exp in ("vanishing_feature", "merging_through_vf"):
        cfg = vfnb.resolve(exp, "cpu")
        for norm in ("none", "bn", "ln"):
            ours = edge_configs(arch_cfg(cfg, "vgg16"), model="vgg16", norm=norm)
            assert [c.key for c in ours] == [c.key for c in edge_configs(merging, model="vgg16", norm=norm)]
        res = edge_configs(arch_cfg(cfg, "resnet20"), model="resnet20", norm="bn")
        assert res[0].model_kwargs["width"] == 1.0 and res[0].epochs == merging.epochs
        assert set(ARCHS) >= {"VGG16", "VGG16-BN", "ResNet20", "ResNet20-LN"}
    with pytest.raises(vfnb.ConfigError, match="alignment"):
        vfnb.resolve("merging_through_vf", "smoke", alignment="zipit")
