"""Weight and activation matching (vfnb.matching): recovery of a known permutation, restriction, errors."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from vfnb.data import VisionData, load_dataset
from vfnb.graph import (Permutation, apply_permutation, block_index, identity_permutation, permutation_spec,
                        random_permutation)
from vfnb.activations import CrossMoments
from vfnb.matching import activation_matching, weight_matching
from vfnb.merge import interpolate
from vfnb.models import LayerNorm2d, build_model

MODELS = {
    "mlp-linear": dict(name="mlp", depth=8, width=16),
    "mlp-relu": dict(name="mlp", depth=4, width=16, activation="relu"),
    "mlp-residual": dict(name="mlp", depth=5, width=16, activation="relu", residual=True),
    "vgg16-bn": dict(name="vgg16", norm="bn", width=0.125, in_channels=1, input_size=28),
    "vgg11-ln": dict(name="vgg11", norm="ln", width=0.125, in_channels=1, input_size=28),
    "resnet20-bn": dict(name="resnet20", norm="bn", width=0.25, in_channels=1, input_size=28),
    "resnet20-ln": dict(name="resnet20", norm="ln", width=0.25, in_channels=1, input_size=28),
}


@pytest.fixture(scope="module")
def data() -> VisionData:
    return load_dataset("mnist5k", "test").subset(range(200))


def model_and_copy(key: str, data: VisionData, seed: int = 0):
    """A random-init model with live ReLUs (positive biases, BN statistics from the data), and a
    randomly permuted copy of it."""
    kw = dict(MODELS[key])
    torch.manual_seed(seed)
    model = build_model(kw.pop("name"), **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if m.bias is not None:
                    m.bias.uniform_(0.05, 0.3)
            elif isinstance(m, (nn.BatchNorm2d, LayerNorm2d)):  # no ReLU unit dead on every input
                m.weight.uniform_(0.2, 0.5), m.bias.uniform_(0.5, 1.0)
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        for x, _ in data.batches(100):
            model(x)
    model.eval()
    x = data.tensors()[0][:8]
    perm = random_permutation(permutation_spec(model, x), seed=seed + 1)
    return model, apply_permutation(model, perm), perm, x


def assert_aligned(model, copy, found, perm, x):
    assert found == perm.inverse()
    aligned = apply_permutation(copy, found)
    for k, v in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(interpolate(model, aligned, 0.5)(x), model(x))


@pytest.mark.parametrize("key", MODELS)
def test_weight_matching_recovers_a_permutation(key, data):
    model, copy, perm, x = model_and_copy(key, data)
    found = weight_matching(model, copy, x, seed=3)
    assert_aligned(model, copy, found, perm, x)


@pytest.mark.parametrize("key", ["mlp-linear", "mlp-relu", "mlp-residual", "vgg16-bn", "vgg11-ln", "resnet20-bn"])
def test_activation_matching_recovers_a_permutation(key, data):
    model, copy, perm, x = model_and_copy(key, data)
    found = activation_matching(model, copy, data, batch_size=64)
    assert_aligned(model, copy, found, perm, x)
    assert activation_matching(model, copy, data.tensors()[0], batch_size=200, max_batches=1) == found


def test_matchers_are_deterministic(data):
    torch.manual_seed(0)
    a, b = (build_model("vgg11", norm="ln", width=0.125, in_channels=1, input_size=28) for _ in range(2))
    x = data.tensors()[0][:4]
    assert weight_matching(a, b, x, seed=5) == weight_matching(a, b, x, seed=5)
    assert activation_matching(a, b, data, batch_size=70) == activation_matching(a, b, data, batch_size=70)


def test_streaming_correlation_is_exact_and_never_nan():
    torch.manual_seed(0)
    x, y = torch.randn(5, 1000, dtype=torch.float64) * 3 + 7, torch.randn(5, 1000, dtype=torch.float64)
    x[2] = 4.0  # a zero-variance unit
    m = CrossMoments(5, torch.device("cpu"))
    for i in range(0, 1000, 300):  # uneven batches
        m.add(x[:, i:i + 300].float().double(), y[:, i:i + 300].float().double())
    want = torch.corrcoef(torch.cat([x.float().double(), y.float().double()]))[:5, 5:]
    got = m.corr()
    assert not got.isnan().any() and torch.equal(got[2], torch.zeros(5))
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-9)


@pytest.mark.parametrize("key", ["vgg16-bn", "resnet20-ln"])
def test_layers_restriction_leaves_deeper_groups_at_identity(key, data):
    model, copy, perm, x = model_and_copy(key, data)
    spec = permutation_spec(model, x)
    for l in (0, 4, 9):
        for found in (weight_matching(model, copy, x, layers=l),
                      activation_matching(model, copy, data, batch_size=100, layers=l)):
            for g in spec.groups:
                want = perm.inverse()[g.index] if g.depth <= l else torch.arange(g.size)
                assert torch.equal(found[g.index], want), (l, g.index)
    assert weight_matching(model, copy, x, layers=spec.num_layers) == perm.inverse()
    assert weight_matching(model, copy, x, layers=0) == identity_permutation(spec)
    for bad in (-1, spec.num_layers + 1, 2.5, True):
        with pytest.raises(ValueError, match=rf"layers must be an integer in \[0, {spec.num_layers}\]"):
            weight_matching(model, copy, x, layers=bad)


def test_matchers_reject_different_architectures(data):
    a = build_model("vgg11", width=0.125, in_channels=1, input_size=28)
    x = data.tensors()[0][:2]
    for b in (build_model("vgg11", width=0.25, in_channels=1, input_size=28), build_model("mlp")):
        with pytest.raises(ValueError, match="architecture|shape mismatch"):
            weight_matching(a, b, x)
        with pytest.raises(ValueError, match="architecture|shape mismatch"):
            activation_matching(a, b, data)
    with pytest.raises(ValueError, match="does not fit"):
        weight_matching(a, a, torch.randn(2, 3, 32, 32))


def reference_weight_matching(a, b, spec, seed, max_iter=100):
    """Textbook coordinate descent: every group re-solved from scratch in every sweep."""
    by_key, sa, sb = spec.by_key(), a.state_dict(), b.state_dict()
    perms = [torch.arange(g.size) for g in spec.groups]
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for gi in rng.permutation(list(range(len(perms)))).tolist():
            g = spec.groups[gi]
            S = torch.zeros(g.size, g.size, dtype=torch.float64)
            for e in g.entries:
                wb = sb[e.key].double()
                for h, f in by_key[e.key]:
                    if f.axis != e.axis:
                        wb = wb.index_select(f.axis, block_index(perms[h], f.block))
                S += sa[e.key].double().movedim(e.axis, 0).reshape(g.size, -1) @ \
                    wb.movedim(e.axis, 0).reshape(g.size, -1).T
            col = torch.from_numpy(linear_sum_assignment(S.numpy(), maximize=True)[1])
            rows = torch.arange(g.size)
            old, new = S[rows, perms[gi]].sum().item(), S[rows, col].sum().item()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[gi], changed = col, True
        if not changed:
            return perms


def test_weight_matching_equals_the_textbook_descent_on_a_random_pair(data):
    """Skipping unchanged groups and updating the similarity incrementally change nothing."""
    kw = dict(norm="bn", width=0.125, in_channels=1, input_size=28)
    torch.manual_seed(0)
    a = build_model("vgg11", **kw)
    torch.manual_seed(1)
    b = build_model("vgg11", **kw)
    x = data.tensors()[0][:2]
    found = weight_matching(a, b, x, seed=4, orders=1)
    want = reference_weight_matching(a, b, permutation_spec(a, x), seed=4)
    assert found == Permutation(found.spec, tuple(want))
    assert found != identity_permutation(found.spec)


def test_matching_handles_blocks_shared_modules_and_channels_last():
    from test_graph import ChannelsLast, SharedConv  # flatten blocks + LayerNorm after permute; a reused conv
    for cls, shape in ((ChannelsLast, (3, 29, 29)), (SharedConv, (3, 12, 12))):
        torch.manual_seed(0)
        model, x = cls().eval(), torch.randn(64, *shape)
        perm = random_permutation(permutation_spec(model, x), seed=3)
        copy = apply_permutation(model, perm)
        assert weight_matching(model, copy, x) == perm.inverse()
        assert activation_matching(model, copy, x, batch_size=16) == perm.inverse()


def test_matchers_refuse_a_diverged_model(data):
    a, b, _, x = model_and_copy("mlp-relu", data)
    with torch.no_grad():
        next(b.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model_b has non-finite values.*diverged"):
        weight_matching(a, b, x)
    with pytest.raises(ValueError, match="model_b has non-finite values"):
        activation_matching(a, b, data, example_input=x)
