"""ZipIt! (vfnb.zipit): self-zip identity, permutation recovery, the greedy rules for α and β,
merge/unmerge algebra, REPAIR targets, and errors."""
import math

import pytest
import torch
from torch import nn

from vfnb.data import VisionData, load_dataset
from vfnb.graph import UnsupportedOperationError, apply_permutation, permutation_spec, random_permutation
from vfnb.merge import interpolate
from vfnb.models import LayerNorm2d, build_model
from vfnb.zipit import Zip, match_features, merge_matrix, zipit_matching

MODELS = {
    "mlp-linear": dict(name="mlp", depth=4, width=12),
    "mlp-relu": dict(name="mlp", depth=4, width=12, activation="relu"),
    "vgg11": dict(name="vgg11", norm="none", width=0.125, in_channels=1, input_size=28),
    "vgg11-bn": dict(name="vgg11", norm="bn", width=0.125, in_channels=1, input_size=28),
    "vgg11-ln": dict(name="vgg11", norm="ln", width=0.125, in_channels=1, input_size=28),
}


@pytest.fixture(scope="module")
def data() -> VisionData:
    return load_dataset("mnist5k", "test").subset(range(64))


def live_model(key: str, data: VisionData, seed: int = 0) -> nn.Module:
    """A random-init model whose ReLU units are not dead on every input (BN statistics from the data)."""
    kw = dict(MODELS[key])
    torch.manual_seed(seed)
    model = build_model(kw.pop("name"), **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.uniform_(0.05, 0.3)
            elif isinstance(m, (nn.BatchNorm2d, LayerNorm2d)):
                m.weight.uniform_(0.2, 0.5), m.bias.uniform_(0.5, 1.0)
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        for x, _ in data.batches(32):
            model(x)
    return model.eval()


def outputs(model: nn.Module, data: VisionData) -> torch.Tensor:
    with torch.no_grad():
        return model(data.tensors()[0])


@pytest.mark.parametrize("key", list(MODELS))
def test_zipping_a_model_with_itself_reproduces_it(key, data):
    model = live_model(key, data)
    z = zipit_matching(model, model, data)
    for row in z.summary():
        assert row["cross"] == row["n"] and row["within a"] == row["within b"] == 0, row
    for w in (0.0, 0.3):
        merged = z.merge(model, model, weight=w)
        assert torch.allclose(outputs(merged, data), outputs(model, data), atol=1e-4, rtol=1e-4)


def test_self_zip_with_dead_units(data):
    """Units dead on every input are constant; they pair with their copy, and the model is reproduced."""
    model = live_model("vgg11", data)
    with torch.no_grad():
        model.features[0].bias[:3] = -100.0  # three dead channels in the first layer
        model.features[3].bias[:2] = -100.0
    z = zipit_matching(model, model, data)
    assert z.layers["features.0"].counts["cross"] == z.layers["features.0"].size
    assert torch.allclose(outputs(z.merge(model, model), data), outputs(model, data), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["mlp-relu", "vgg11-ln"])
def test_recovers_a_permutation_with_beta_zero(key, data):
    model = live_model(key, data)
    perm = random_permutation(permutation_spec(model, data.tensors()[0][:2]), seed=3)
    copy = apply_permutation(model, perm)
    z = zipit_matching(model, copy, data, beta=0.0)
    assert z.as_permutation() == perm.inverse()
    merged = z.merge(model, copy, weight=0.3)
    assert torch.allclose(outputs(merged, data), outputs(model, data), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["mlp-relu", "vgg11-bn"])
def test_one_to_one_zip_is_interpolation_of_the_permuted_model(key, data):
    """With α = β = 0 every cluster is one unit of each model: zipping is θ_w = (1−w)θ_a + w·π(θ_b)."""
    a, b = live_model(key, data, seed=0), live_model(key, data, seed=1)
    z = zipit_matching(a, b, data, decay=0.0, beta=0.0)
    ref_b = apply_permutation(b, z.as_permutation())
    for w in (0.0, 0.25, 1.0):
        merged, ref = z.merge(a, b, weight=w).state_dict(), interpolate(a, ref_b, w).state_dict()
        for k, v in ref.items():
            assert torch.allclose(merged[k], v, atol=1e-6), k


def test_bias_calibration_and_repair_compose_with_zipit(data):
    """Bias calibration of a one-to-one zip is vfnb.merge.calibrate_bias of the permuted model; REPAIR
    with the zip's targets gives the zipped model's channels exactly those statistics."""
    from vfnb.merge import calibrate_bias
    from vfnb.normalize import layer_stats, repair
    a, b = live_model("vgg11", data, seed=0), live_model("vgg11", data, seed=1)
    z = zipit_matching(a, b, data, decay=0.0, beta=0.0)
    ref = calibrate_bias(a, apply_permutation(b, z.as_permutation()), 0.3).state_dict()
    got = z.merge(a, b, weight=0.3, bias_calibration=True).state_dict()
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    with pytest.raises(ValueError, match="BatchNorm"):
        bn = live_model("vgg11-bn", data)
        zipit_matching(bn, bn, data).merge(bn, bn, bias_calibration=True)

    z = zipit_matching(a, b, data)  # with within-model merges
    x = data.tensors()[0]
    targets = z.target_stats(layer_stats(a, x), layer_stats(b, x), weight=0.5)
    repaired = repair(z.merge(a, b, 0.5), data=x, targets=targets)
    got = layer_stats(repaired, x)
    for name, (m, s_) in targets.items():
        live = s_ > 1e-3
        assert torch.allclose(got[name][0][live], m[live], atol=1e-3), name
        assert torch.allclose(got[name][1][live], s_[live], rtol=1e-3, atol=1e-4), name


def test_greedy_rules_on_a_hand_made_correlation():
    # features a0 a1 b0 b1
    c = torch.tensor([[1.0, 0.9, 0.8, 0.2],
                      [0.9, 1.0, 0.3, 0.7],
                      [0.8, 0.3, 1.0, 0.1],
                      [0.2, 0.7, 0.1, 1.0]])
    U, counts = match_features(c, decay=0.3, beta=1.0)  # budget ⌊1·⌊2/2⌋⌋ = 1 within-model merge per model
    assert U.T.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]  # a0+a1 (0.9), then b0+b1 (0.1 beats 0.3·min)
    assert counts["within_a"] == counts["within_b"] == 1 and counts["cross"] == 0
    U, counts = match_features(c, decay=0.3, beta=0.0)
    assert U.T.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]  # a0+b0 (0.8), then a1+b1 (0.7 beats 0.3·min)
    assert counts["cross"] == 2

    # α decides whether a merged feature is merged again
    c = torch.tensor([[1.0, 0.5, 0.9, -0.2],
                      [0.5, 1.0, 0.8, -0.5],
                      [0.9, 0.8, 1.0, -0.3],
                      [-0.2, -0.5, -0.3, 1.0]])
    U, _ = match_features(c, decay=0.3, beta=0.0)  # (a0,b0) at 0.9; then 0.3·min(0.5, 0.8)=0.15 > −0.5
    assert U.T.tolist() == [[1, 1, 1, 0], [0, 0, 0, 1]]
    U, _ = match_features(c, decay=0.0, beta=0.0)  # α = 0: merged once, never again
    assert U.T.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]


def test_beta_caps_within_model_merges(data):
    a, b = live_model("vgg11", data, seed=0), live_model("vgg11", data, seed=1)
    with torch.no_grad():  # a duplicated unit in model a: correlation 1 with its twin
        a.features[0].weight[1] = a.features[0].weight[0]
        a.features[0].bias[1] = a.features[0].bias[0]
    n = a.features[0].out_channels
    z0 = zipit_matching(a, b, data, beta=0.0)
    assert all(g.counts["within_a"] == g.counts["within_b"] == 0 for g in z0.groups)
    z = zipit_matching(a, b, data, beta=0.25)
    first = z.layers["features.0"]
    assert first.counts["within_a"] == 1 == int(0.25 * (n // 2))
    assert first.unmerge[0, :].argmax() == first.unmerge[1, :].argmax()  # the twins share a cluster
    with pytest.raises(ValueError, match="not a permutation"):
        z.as_permutation()
    z1 = zipit_matching(a, b, data, beta=1.0)
    for g in z1.groups:
        assert g.counts["within_a"] <= g.size // 2 and g.counts["within_b"] <= g.size // 2
        assert g.counts["cross"] + g.counts["within_a"] + g.counts["within_b"] == g.size


def test_merge_and_unmerge_matrices(data):
    a, b = live_model("vgg11", data, seed=0), live_model("vgg11", data, seed=1)
    z = zipit_matching(a, b, data, beta=1.0)
    assert isinstance(z, Zip)
    for g, M, U in zip(z.groups, z.merge_matrices(0.5), z.unmerge_matrices()):
        n = g.size
        assert M.shape == (n, 2 * n) and U.shape == (2 * n, n)
        assert torch.all((U == 0) | (U == 1)) and torch.all(U.sum(1) == 1)  # every feature in one cluster
        assert torch.allclose(M @ U, torch.eye(n, dtype=M.dtype))  # U is a right inverse of M
        assert torch.allclose(M.sum(1), torch.ones(n, dtype=M.dtype))
        assert torch.allclose(M, (U / U.sum(0)).T)  # w = 0.5: ZipIt!'s plain average
        M0 = merge_matrix(U, 0.0)
        has_a = U[:n].sum(0) > 0
        assert torch.all(M0[has_a][:, n:] == 0)  # at w = 0, a cluster with an a-feature ignores b


def test_target_stats(data):
    model = live_model("vgg11-bn", data)  # no dead units: the permutation is recovered exactly
    perm = random_permutation(permutation_spec(model, data.tensors()[0][:2]), seed=5)
    copy = apply_permutation(model, perm)
    z = zipit_matching(model, copy, data, beta=0.0)
    gen = torch.Generator().manual_seed(0)
    stats_a = {name: (torch.randn(g.size, generator=gen), torch.rand(g.size, generator=gen) + 0.1)
               for name, g in z.layers.items()}
    stats_a["classifier"] = (torch.randn(10, generator=gen), torch.rand(10, generator=gen))
    spec = z.spec
    stats_b = {}
    for name, (m, s) in stats_a.items():  # the copy's channel j is the model's channel perm[j]
        g = spec.group_of(f"{name}.weight", 0)
        p = perm.perms[g.index] if g is not None else torch.arange(len(m))
        stats_b[name] = (m[p], s[p])
    for w in (0.0, 0.4):
        t = z.target_stats(stats_a, stats_b, weight=w)
        for name, (m, s) in stats_a.items():
            assert torch.allclose(t[name][0], m, atol=1e-6) and torch.allclose(t[name][1], s, atol=1e-6), name
    with pytest.raises(ValueError, match="same layers"):
        z.target_stats(stats_a, {k: v for k, v in stats_b.items() if k != "classifier"})
    bad = dict(stats_b, **{"features.0": (torch.zeros(3), torch.ones(3))})
    with pytest.raises(ValueError, match="features.0"):
        z.target_stats(stats_a, bad)


def test_one_shot_iterator_and_determinism(data):
    a, b = live_model("mlp-relu", data, seed=0), live_model("mlp-relu", data, seed=1)
    x = data.tensors()[0]
    z1 = zipit_matching(a, b, (x[i:i + 40] for i in range(0, len(x), 40)))
    z2 = zipit_matching(a, b, x, batch_size=40)
    for g1, g2 in zip(z1.groups, z2.groups):
        assert torch.equal(g1.unmerge, g2.unmerge)


def test_errors(data):
    x = data.tensors()[0][:4]
    torch.manual_seed(0)
    res = build_model("resnet20", norm="bn", width=0.25, in_channels=1, input_size=28).eval()
    with pytest.raises(UnsupportedOperationError, match="residual"):
        zipit_matching(res, res, x)
    mlp = build_model("mlp", depth=4, width=12, activation="relu", residual=True)
    with pytest.raises(UnsupportedOperationError, match="residual"):
        zipit_matching(mlp, mlp, x)
    a = live_model("vgg11", data)
    other = build_model("vgg11", norm="none", width=0.25, in_channels=1, input_size=28)
    with pytest.raises(ValueError, match="shape mismatch"):
        zipit_matching(a, other, x)
    for kw in ({"decay": 1.5}, {"beta": -0.1}, {"decay": math.nan}):
        with pytest.raises(ValueError, match="decay|beta"):
            zipit_matching(a, a, x, **kw)
    with pytest.raises(ValueError, match="at least one batch"):
        zipit_matching(a, a, x[:0])
    z = zipit_matching(a, a, x)
    with pytest.raises(ValueError, match="alpha must be in"):
        z.merge(a, a, weight=1.2)
    with pytest.raises(ValueError, match="shape mismatch|another model"):
        z.merge(other, other)
    with pytest.raises(ValueError, match="2n"):
        match_features(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        match_features(torch.full((4, 4), math.nan))
