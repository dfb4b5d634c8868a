"""REPAIR / RESCALE / RESET / bias removal / bias calibration (vfnb.normalize).

Every check measures the facts directly with forward hooks and plain torch reductions, independently
of the statistics code in vfnb.normalize.
"""
import warnings

import pytest
import torch
from torch import nn

from vfnb import build_model, interpolate
from vfnb.data import VisionData
from vfnb.merge import calibrate_bias
from vfnb.normalize import layer_stats, remove_bias, repair, rescale, reset_bn_stats, target_stats, weighted_stats
from vfnb.structure import conv_linear_layers, repair_layers

MNIST = {"in_channels": 1, "input_size": 28}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is much faster than two on a shared CPU (and restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inputs(n=48, seed=0, shape=(1, 28, 28)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def make(name, seed, **kw):
    torch.manual_seed(seed)
    return build_model(name, **kw).eval()


def triple(name, **kw):
    """Two random edge models and their midpoint."""
    if name != "mlp":
        kw = {**MNIST, **kw}
    a, b = make(name, 0, **kw), make(name, 1, **kw)
    return a, b, interpolate(a, b, 0.5)


@torch.no_grad()
def preact(model, x, layers):
    """Per-channel population mean/std of each layer's pre-activation, measured directly: the output of
    the norm module right after the layer if the next executed module is a norm, else the layer's own."""
    mods = dict(model.named_modules())
    order, outs = [], {}
    def record(n):
        def fn(mod, inp, out):
            order.append(n)
            outs[n] = out
        return fn

    hooks = [m.register_forward_hook(record(n)) for n, m in mods.items() if not list(m.children())]
    model.eval()(x)
    for h in hooks:
        h.remove()
    res = {}
    for n in layers:
        nxt = order[order.index(n) + 1] if order.index(n) + 1 < len(order) else None
        norm = nxt is not None and ("norm" in nxt or isinstance(mods[nxt], (nn.BatchNorm2d, nn.LayerNorm))
                                    or type(mods[nxt]).__name__ == "LayerNorm2d")
        y = outs[nxt if norm else n].double()
        y = y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() == 4 else y.T
        res[n] = (y.mean(1), y.std(1, unbiased=False))
    return res


def assert_close(a, b, rel=1e-4, abs_=1e-7):
    assert torch.allclose(a, b, rtol=rel, atol=abs_), (a - b).abs().max()


CASES = [("vgg16", {"norm": "none", "width": 0.0625}), ("vgg16", {"norm": "bn", "width": 0.0625}),
         ("vgg16", {"norm": "ln", "width": 0.0625}), ("resnet20", {"norm": "bn", "width": 0.25}),
         ("resnet20", {"norm": "ln", "width": 0.25}),
         ("mlp", {"depth": 5, "width": 16, "activation": "relu", "in_features": 784})]


def test_layer_lists_follow_the_paper():
    vgg, res = make("vgg16", 0, width=0.0625, **MNIST), make("resnet20", 0, width=0.25, **MNIST)
    lv, lr = conv_linear_layers(vgg), conv_linear_layers(res)
    assert len(lv) == 14 and lv[-1] == "classifier" and lv[0] == "features.0"
    assert len(lr) == 20 and lr[0] == "conv1" and lr[-1] == "linear"
    assert not any("shortcut" in n for n in lr)
    assert sum("shortcut" in n for n, m in res.named_modules() if isinstance(m, nn.Conv2d)) == 2
    assert repair_layers(vgg) == lv[:-1]
    assert repair_layers(res) == [n for n in lr if n.startswith("layer")] and len(repair_layers(res)) == 18
    assert repair_layers(make("mlp", 0, depth=4, width=8)) == ["layers.0", "layers.1", "layers.2"]
    assert repair_layers(make("mlp", 0, depth=4, width=8, residual=True)) == ["layers.1", "layers.2"]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{k.get('norm', 'mlp')}" for n, k in CASES])
def test_repair_matches_targets_and_keeps_architecture(name, kw):
    a, b, merged = triple(name, **kw)
    x = inputs(40, shape=(784,) if name == "mlp" else (1, 28, 28))
    layers = repair_layers(merged)
    sa, sb = preact(a, x, layers), preact(b, x, layers)
    out = repair(merged, [a, b], [0.3, 0.7], x)
    got = preact(out, x, layers)
    for n in layers:
        assert_close(got[n][0], 0.3 * sa[n][0] + 0.7 * sb[n][0], abs_=1e-5)
        assert_close(got[n][1], 0.3 * sa[n][1] + 0.7 * sb[n][1])
    # folded: same modules, same parameter shapes and count, and the input model is untouched
    assert [type(m) for m in out.modules()] == [type(m) for m in merged.modules()]
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in merged.state_dict().items()}
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in merged.parameters())
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in interpolate(a, b, 0.5).state_dict().items())


def test_folding_equals_the_unfolded_affine_correction():
    a, b, merged = triple("vgg16", norm="none", width=0.0625)
    x, test = inputs(40), inputs(8, seed=5)
    layer = "features.10"
    st, sm = preact(a, x, [layer])[layer], preact(merged, x, [layer])[layer]
    s = (st[1] / sm[1]).float().view(1, -1, 1, 1)
    t = (st[0] - st[1] / sm[1] * sm[0]).float().view(1, -1, 1, 1)
    h = dict(merged.named_modules())[layer].register_forward_hook(lambda m, i, o: o * s + t)
    with torch.no_grad():
        expected = merged(test)
    h.remove()
    with torch.no_grad():
        got = repair(merged, [a], [1.0], x, layers=[layer])(test)
    assert_close(got, expected, rel=1e-4, abs_=1e-5)


def test_streaming_and_precomputed_targets_agree_with_one_pass():
    a, b, merged = triple("vgg16", norm="ln", width=0.0625)
    x, test = inputs(40), inputs(8, seed=3)
    tg = target_stats([a, b], [0.5, 0.5], x)
    one = repair(merged, [a, b], [0.5, 0.5], x)
    pre = repair(merged, data=x, targets=tg)
    stream = repair(merged, [a, b], [0.5, 0.5], x, batch_size=16)
    mixed = repair(merged, data=x, targets=weighted_stats([layer_stats(a, x), layer_stats(b, x)], [0.5, 0.5]))
    with torch.no_grad():
        assert_close(pre(test), one(test), abs_=1e-6)
        assert_close(mixed(test), one(test), abs_=1e-6)
        assert_close(stream(test), one(test), rel=1e-3, abs_=1e-5)


def test_data_formats_give_the_same_statistics():
    m = make("vgg16", 0, width=0.0625, **MNIST)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 28, 28), generator=g, dtype=torch.uint8)
    vd = VisionData("mnist5k", images, torch.zeros(30, dtype=torch.long), (0.1307,), (0.3081,), 10)
    x = vd.tensors()[0]
    s1 = layer_stats(m, vd)
    s2 = layer_stats(m, x, batch_size=7)
    s3 = layer_stats(m, [(x[:10], None), (x[10:], None)])
    direct = preact(m, x, list(s1))
    for n in s1:
        for s in (s2, s3, direct):
            assert_close(s1[n][0], s[n][0], abs_=1e-6)
            assert_close(s1[n][1], s[n][1])
    s4 = layer_stats(m, vd, n_samples=12)  # a VisionData gives a stratified subset, a tensor its first n
    from vfnb.data import calibration_subset
    sub = calibration_subset(vd, 12).tensors()[0]
    assert_close(s4["features.0"][0], preact(m, sub, ["features.0"])["features.0"][0], abs_=1e-6)
    s5 = layer_stats(m, x, n_samples=12)
    assert_close(s5["features.0"][0], preact(m, x[:12], ["features.0"])["features.0"][0], abs_=1e-6)


def test_rescale_matches_std_and_only_scales_the_mean():
    a, b, merged = triple("vgg16", norm="none", width=0.0625)
    x = inputs(40)
    layers = repair_layers(merged)
    target = {n: (0.5 * (ma + mb), 0.5 * (sa + sb))
              for n, (ma, sa), (mb, sb) in zip(layers, preact(a, x, layers).values(), preact(b, x, layers).values())}
    out = rescale(merged, [a, b], [0.5, 0.5], x)
    got = preact(out, x, layers)
    for n in layers:
        assert_close(got[n][1], target[n][1])
    assert not torch.allclose(got["features.0"][0], target["features.0"][0], rtol=1e-2)
    # one layer: the mean is multiplied by the same factor as the std, no shift
    before = preact(merged, x, ["features.2"])["features.2"]
    one = preact(rescale(merged, [a, b], [0.5, 0.5], x, layers=["features.2"]), x, ["features.2"])["features.2"]
    assert_close(one[0], before[0] * target["features.2"][1] / before[1], abs_=1e-6)


def test_reset_equals_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    model[1].running_mean.fill_(5.0)
    model[1].momentum = 0.3
    x = inputs(32)
    with torch.no_grad():
        y = model[0](x).transpose(0, 1).reshape(4, -1)
    out = reset_bn_stats(model, x)
    bn = out[1]
    assert not out.training and bn.momentum == 0.3 and model[1].running_mean[0] == 5.0
    assert_close(bn.running_mean, y.mean(1), abs_=1e-6)
    assert_close(bn.running_var, y.var(1, unbiased=True), rel=1e-4)
    # two batches: the cumulative average (momentum=None) of the per-batch statistics
    out2 = reset_bn_stats(model, x, batch_size=16)
    with torch.no_grad():
        ys = [model[0](xb).transpose(0, 1).reshape(4, -1) for xb in (x[:16], x[16:])]
    assert_close(out2[1].running_mean, sum(v.mean(1) for v in ys) / 2, abs_=1e-6)
    assert_close(out2[1].running_var, sum(v.var(1) for v in ys) / 2, rel=1e-4)


def test_reset_normalizes_every_bn_of_a_merged_resnet():
    _, _, merged = triple("resnet20", norm="bn", width=0.25)
    x = inputs(64)
    out = reset_bn_stats(merged, x)
    bns = [n for n, m in out.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # in eval mode each BN now standardizes its input: output (y - beta)/gamma has mean 0, std 1 on the data
    mods = dict(out.named_modules())
    for m in mods.values():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    stats = preact(out, x, [n.replace("norm", "conv") if "norm" in n else n.replace(".1", ".0") for n in bns])
    for mean, std in stats.values():
        assert mean.abs().max() < 0.05 and (std - 1).abs().max() < 0.05


def test_calibrate_bias_follows_the_power_law():
    a, b, _ = triple("vgg16", norm="none", width=0.0625)
    for m in (a, b):
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.normal_()
    alpha = 0.3
    out = calibrate_bias(a, b, alpha)
    mods_a, mods_b, mods = dict(a.named_modules()), dict(b.named_modules()), dict(out.named_modules())
    convs = [n for n, m in a.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for l, n in enumerate(convs, start=1):
        assert_close(mods[n].bias, (0.7 ** l) * mods_a[n].bias + (0.3 ** l) * mods_b[n].bias, rel=1e-6, abs_=1e-7)
        assert_close(mods[n].weight, 0.7 * mods_a[n].weight + 0.3 * mods_b[n].weight, rel=1e-6, abs_=1e-7)
    assert torch.equal(calibrate_bias(a, b, 0.0).classifier.bias, a.classifier.bias)
    # ResNet20-LN: only the classifier (layer 20) has a bias; the LayerNorm biases stay linear
    a, b, _ = triple("resnet20", norm="ln", width=0.25)
    with torch.no_grad():
        for m in (a, b):
            m.linear.bias.normal_(), m.norm1.bias.normal_()
    out = calibrate_bias(a, b, 0.5)
    assert_close(out.linear.bias, 0.5 ** 20 * (a.linear.bias + b.linear.bias), rel=1e-6, abs_=1e-12)
    assert_close(out.norm1.bias, 0.5 * (a.norm1.bias + b.norm1.bias), rel=1e-6)


def test_calibrate_bias_refuses_batchnorm_and_bad_alpha():
    a, b, _ = triple("vgg16", norm="bn", width=0.0625)
    with pytest.raises(ValueError, match="BatchNorm"):
        calibrate_bias(a, b, 0.5)
    a, b, _ = triple("vgg16", norm="none", width=0.0625)
    with pytest.raises(ValueError, match="alpha"):
        calibrate_bias(a, b, 1.5)
    with pytest.raises(ValueError, match="architecture|shape"):
        calibrate_bias(a, make("vgg16", 0, width=0.125, **MNIST), 0.5)


def test_remove_bias_zeroes_exactly_the_chosen_layers():
    m = make("vgg16", 0, width=0.0625, **MNIST)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.0)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    for kw, zeroed in (({"last": 3}, convs[-3:]), ({"first": 2}, convs[:2]), ({"last": 0}, [])):
        out = remove_bias(m, **kw)
        mods = dict(out.named_modules())
        for n in convs:
            assert bool((mods[n].bias == 0).all()) == (n in zeroed), (kw, n)
        assert all(bool((p != 0).all()) for p in m.parameters() if p.dim() == 1)  # input untouched
    with pytest.raises(ValueError, match="exactly one"):
        remove_bias(m, last=1, first=1)
    with pytest.raises(ValueError, match=r"\[0, 14\]"):
        remove_bias(m, last=15)


def test_zero_variance_channel_warns_and_stays_finite():
    a, b, merged = triple("vgg16", norm="none", width=0.0625)
    with torch.no_grad():
        merged.features[0].weight[0].zero_()  # channel 0 of layer 1 is now the constant bias
        merged.features[0].bias[0] = 0.25
    x = inputs(40)
    with pytest.warns(RuntimeWarning, match="1 of .* channels"):
        out = repair(merged, [a, b], [0.5, 0.5], x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = out(inputs(8, seed=9))
        got = preact(out, x, ["features.0"])["features.0"]
        tgt = 0.5 * (preact(a, x, ["features.0"])["features.0"][0] + preact(b, x, ["features.0"])["features.0"][0])
        assert torch.isfinite(y).all() and all(torch.isfinite(p).all() for p in out.parameters())
        assert_close(got[0][:1], tgt[:1], abs_=1e-6)  # its mean is still set
        assert torch.isfinite(rescale(merged, [a, b], None, x)(x[:4])).all()


def test_errors_name_the_problem():
    a, b, merged = triple("vgg16", norm="none", width=0.0625)
    x = inputs(8)
    with pytest.raises(ValueError, match="needs data"):
        repair(merged, [a, b], [0.5, 0.5])
    with pytest.raises(ValueError, match="either references"):
        repair(merged, data=x)
    with pytest.raises(ValueError, match="2 weights for 1"):
        repair(merged, [a], [0.5, 0.5], x)
    with pytest.raises(ValueError, match="not conv/linear layers"):
        repair(merged, [a], [1.0], x, layers=["features.1"])
    with pytest.raises(ValueError, match="no statistics for layer"):
        repair(merged, data=x, targets=target_stats([a], [1.0], x, layers=["features.0"]),
               layers=["features.0", "features.2"])
    with pytest.raises(ValueError, match="different layers|shape mismatch"):
        repair(merged, [make("vgg11", 0, width=0.0625, **MNIST)], [1.0], x)
    with pytest.raises(ValueError, match="at least 2"):
        repair(merged, [a], [1.0], x[:1])
    with pytest.raises(ValueError, match="no BatchNorm"):
        reset_bn_stats(merged, x)
    with pytest.raises(ValueError, match="different layers"):
        weighted_stats([layer_stats(a, x), layer_stats(a, x, layers=["features.0"])], [0.5, 0.5])
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_stats([layer_stats(a, x)], [-1.0])
    with pytest.raises(TypeError, match="data must be"):
        layer_stats(merged, 3)
    nob = make("mlp", 0, depth=3, width=8, bias=False)
    xm = torch.randn(16, 784)
    with pytest.raises(ValueError, match="no bias and no norm"):
        repair(nob, [make("mlp", 1, depth=3, width=8, bias=False)], [1.0], xm)
    assert rescale(nob, [make("mlp", 1, depth=3, width=8, bias=False)], [1.0], xm) is not nob


def test_n_samples_of_a_class_sorted_dataset_is_stratified():
    """mnist5k is stored sorted by class: a calibration subset must still see every class."""
    from vfnb.data import load_dataset
    from vfnb.activations import inputs as _inputs
    data = load_dataset("mnist5k", "train")
    sorted_data = data.subset(torch.argsort(data.labels, stable=True))
    x = _inputs(sorted_data, n_samples=50)
    assert x.shape[0] == 50
    picked = {tuple(v.flatten()[:50].tolist()) for v in x}
    by_class = {int(c): {tuple(v.flatten()[:50].tolist()) for v in sorted_data.subset(
        torch.nonzero(sorted_data.labels == c).flatten()[:400]).tensors()[0]} for c in range(10)}
    classes = {c for c, imgs in by_class.items() if picked & imgs}
    assert len(classes) == 10
