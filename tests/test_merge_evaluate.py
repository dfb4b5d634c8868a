import numpy as np
import pytest
import torch

from vfnb import barrier, build_model, evaluate, interpolate, interpolation_curve
from vfnb.data import VisionData


def tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return VisionData("mnist5k", images, labels, (0.1307,), (0.3081,), 10)


def pair(name="vgg11", **kw):
    torch.manual_seed(0)
    a = build_model(name, **kw)
    torch.manual_seed(1)
    b = build_model(name, **kw)
    return a, b


def test_interpolate_is_elementwise_lerp_and_leaves_inputs_alone():
    a, b = pair("vgg11", in_channels=1, norm="bn", width=0.125, input_size=28)
    with torch.no_grad():  # give BN buffers distinct values
        for m, v in ((a, 1.0), (b, 3.0)):
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.fill_(v)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    m = interpolate(a, b, 0.25)
    sa, sb, sm = a.state_dict(), b.state_dict(), m.state_dict()
    for k in sm:
        if sm[k].is_floating_point():
            torch.testing.assert_close(sm[k], 0.75 * sa[k] + 0.25 * sb[k])
        else:
            assert torch.equal(sm[k], sa[k])
    assert float(sm["features.1.running_mean"][0]) == pytest.approx(1.5)
    for k, v in before.items():
        assert torch.equal(a.state_dict()[k], v)
    x = torch.randn(3, 1, 28, 28)
    a.eval(); b.eval()
    torch.testing.assert_close(interpolate(a, b, 0.0)(x), a(x))
    torch.testing.assert_close(interpolate(a, b, 1.0)(x), b(x))


def test_interpolate_rejects_bad_inputs():
    a, _ = pair("vgg11", width=0.125)
    with pytest.raises(ValueError, match="same architecture"):
        interpolate(a, build_model("mlp"), 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        interpolate(a, build_model("vgg11", width=0.25), 0.5)
    with pytest.raises(ValueError, match="different layers"):
        interpolate(a, build_model("vgg11", width=0.125, norm="bn"), 0.5)
    for bad in (-0.1, 1.01, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            interpolate(a, a, bad)


def test_evaluate_matches_manual_computation():
    data = tiny_data()
    m = build_model("mlp", depth=2, width=16).eval()
    x, y = data.tensors()
    with torch.no_grad():
        out = m(x)
    r = evaluate(m, data, batch_size=10)
    assert r["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-5)


def test_interpolation_curve_ends_are_edges_and_barrier_definition():
    data = tiny_data()
    a, b = pair("mlp", depth=2, width=16)
    c = interpolation_curve(a, b, data, [0, 0.5, 1], progress=False)
    assert c["accuracy"][0] == evaluate(a, data)["accuracy"]
    assert c["accuracy"][2] == evaluate(b, data)["accuracy"]
    # barrier: max over α of the linear interpolation of edge accuracies minus the actual accuracy
    assert barrier([0, 0.5, 1], [0.9, 0.1, 0.7]) == pytest.approx(0.8 - 0.1)
    assert barrier([0, 0.5, 1], [0.9, 0.95, 0.7]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="include 0 and 1"):
        barrier([0.2, 0.5], [0.5, 0.5])


def test_interpolation_curve_post_processes_each_fresh_merged_model():
    data = tiny_data()
    a, b = pair("mlp", depth=2, width=16)
    seen = []

    def after(merged, alpha):
        seen.append((alpha, merged))
        with torch.no_grad():  # modify in place: the edges must not change
            for p in merged.parameters():
                p.zero_()
        return b if alpha == 0.5 else merged

    before = [p.clone() for p in a.parameters()]
    c = interpolation_curve(a, b, data, [0, 0.5, 1], progress=False, after=after)
    assert [s[0] for s in seen] == [0, 0.5, 1] and len({id(s[1]) for s in seen}) == 3
    assert all(m is not a and m is not b for _, m in seen)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert c["accuracy"][1] == evaluate(b, data)["accuracy"]  # what `after` returns is what is evaluated
    zero = evaluate(seen[0][1], data)["accuracy"]
    assert c["accuracy"][0] == zero and c["accuracy"][2] == zero
