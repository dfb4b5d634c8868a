"""Preserve-First Merging, partial zipping, CCA alignment and cost counting (vfnb.pfm, vfnb.cca, vfnb.flops)."""
import pytest
import torch
from torch import nn

from vfnb.cca import LinearAlignment, cca_matching
from vfnb.flops import count_cost, cost_ratio
from vfnb.graph import UnsupportedOperationError, apply_permutation, permutation_spec, random_permutation
from vfnb.merge import interpolate
from vfnb.models import LayerNorm2d, build_model
from vfnb.normalize import layer_stats, target_stats
from vfnb.structure import conv_linear_layers, repair_layers
from vfnb.pfm import PartialZip, PreserveFirst, partial_zip, preserve_first

KW = {
    "vgg16": dict(name="vgg16", norm="none", width=0.0625, in_channels=1, input_size=28),
    "resnet20": dict(name="resnet20", norm="bn", width=0.25, in_channels=1, input_size=28),
    "vgg11-ln": dict(name="vgg11", norm="ln", width=0.125, in_channels=1, input_size=28),
}


def make(key: str, seed: int) -> nn.Module:
    """A random-init model with live units (positive biases, non-trivial BN statistics)."""
    kw = dict(KW[key])
    torch.manual_seed(seed)
    model = build_model(kw.pop("name"), **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(0.0, 0.2)
            if isinstance(m, (nn.BatchNorm2d, LayerNorm2d)):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(0.0, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the other processes of a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["vgg16", "resnet20"])
def pair(request, x):
    """Two independent models and a random permutation of their spec."""
    a, b = make(request.param, 0), make(request.param, 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=3)
    return request.param, a, b, perm


def close(u: torch.Tensor, v: torch.Tensor, tol: float = 1e-5) -> bool:
    return (u - v).abs().max().item() <= tol * max(1.0, v.abs().max().item())


@torch.no_grad()
def test_layer_count_follows_the_paper(pair, x):
    key, a, b, perm = pair
    L = {"vgg16": 14, "resnet20": 20}[key]
    assert perm.spec.num_layers == L == len(conv_linear_layers(a))
    p = preserve_first(a, b, perm, layers=5)
    assert p.stem_layers[:5] == tuple(conv_linear_layers(a)[:5])
    assert set(conv_linear_layers(a)[5:]) <= set(p.tail_layers)


@torch.no_grad()
def test_l0_is_the_merged_model_and_lL_the_ensemble(pair, x):
    key, a, b, perm = pair
    L = perm.spec.num_layers
    pb = apply_permutation(b, perm)
    for alpha in (0.5, 0.3):
        merged = interpolate(a, pb, alpha)
        assert close(preserve_first(a, b, perm, layers=0, alpha=alpha)(x), merged(x))
        ens = (1 - alpha) * a(x) + alpha * b(x)
        assert close(preserve_first(a, b, perm, layers=L, alpha=alpha)(x), ens)


@torch.no_grad()
def test_alpha_ends_give_the_edge_models(pair, x):
    key, a, b, perm = pair
    for l in (3, 6, 9):  # for ResNet20, 6 falls inside a residual block
        assert close(preserve_first(a, b, perm, layers=l, alpha=0.0)(x), a(x))
        assert close(preserve_first(a, b, perm, layers=l, alpha=1.0)(x), b(x))


@torch.no_grad()
def test_merging_a_model_with_its_permuted_copy_is_the_model_at_every_l(pair, x):
    """Every cut, including those inside a residual block, averages values in one basis."""
    key, a, _, perm = pair
    copy = apply_permutation(a, perm.inverse())  # aligned back onto a by perm
    L = perm.spec.num_layers
    # VGG: after a pool (2) or not (3); ResNet: block boundary (7), inside a block (2, 8; 8 also cuts
    # between a stride-2 block's conv1 and its shortcut conv), the pooled features (19)
    for l in (0, 1, 2, 3, 7, 8, L - 1, L):
        assert close(preserve_first(a, copy, perm, layers=l, alpha=0.5)(x), a(x)), l
    for k in (0, 2, 7, L):
        assert close(partial_zip(a, copy, perm, layers=k)(x), a(x)), k


@torch.no_grad()
def test_pfm_matches_a_hook_based_construction_on_vgg(x):
    """Independent of torch.fx: average the inputs of layer l+1 of both models, feed the merged model."""
    a, b = make("vgg16", 0), make("vgg16", 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=5)
    pb = apply_permutation(b, perm)
    layers = conv_linear_layers(a)
    for l in (1, 4, 8, 13):
        nxt = layers[l]
        seen = {}
        hooks = [m.get_submodule(nxt).register_forward_pre_hook(lambda mod, inp, k=k: seen.__setitem__(k, inp[0]))
                 for k, m in (("a", a), ("b", pb))]
        a(x), pb(x)
        for h in hooks:
            h.remove()
        merged = interpolate(a, pb, 0.5)
        h = merged.get_submodule(nxt).register_forward_pre_hook(lambda mod, inp: (0.5 * seen["a"] + 0.5 * seen["b"],))
        want = merged(x)
        h.remove()
        assert close(preserve_first(a, b, perm, layers=l)(x), want), l


@torch.no_grad()
def test_costs_count_the_stems_twice(pair, x):
    key, a, b, perm = pair
    L = perm.spec.num_layers
    edge = count_cost(a, x[:1])
    assert cost_ratio(preserve_first(a, b, perm, layers=0), a, x[:1]) == {"params": 1.0, "flops": 1.0}
    full = count_cost(preserve_first(a, b, perm, layers=L), x[:1])
    assert full["params"] == 2 * edge["params"] and full["flops"] == pytest.approx(2 * edge["flops"])
    last = {"params": 1.0, "flops": 1.0}
    for l in (1, 2, 6, 7, 8, 13, L - 1):
        p = preserve_first(a, b, perm, layers=l)
        c = count_cost(p, x[:1])
        stem = sum(q.numel() for q in p.stems[0].parameters())
        assert c["params"] == edge["params"] + stem  # one edge model plus a second copy of its stem
        ratio = cost_ratio(p, a, x[:1])
        assert ratio["params"] >= last["params"] and ratio["flops"] >= last["flops"] - 1e-12
        last = ratio
    assert count_cost(partial_zip(a, b, perm, layers=0), x[:1]) == edge


@torch.no_grad()
def test_flops_equal_the_analytic_count(x):
    """2·C_in·C_out·k²·H·W per conv and 2·in·out per linear, per sample (independent of FlopCounterMode)."""
    model = make("vgg16", 0)
    total = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total.append(2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                         * out.shape[2] * out.shape[3])
        else:
            total.append(2 * m.in_features * m.out_features)
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(x[:1])
    for h in hs:
        h.remove()
    c = count_cost(model, x[:4])
    assert c["flops"] == sum(total)
    assert c["params"] == sum(p.numel() for p in model.parameters())


def test_structure_is_readable(pair):
    key, a, b, perm = pair
    p = preserve_first(a, b, perm, layers=3)
    assert isinstance(p, PreserveFirst) and len(p.stems) == 2
    first = conv_linear_layers(a)[0]
    assert isinstance(p.stems[0].get_submodule(first), nn.Conv2d)
    assert isinstance(p.tail.get_submodule(conv_linear_layers(a)[-1]), nn.Linear)
    assert "PFM_3/" in repr(p)
    # stems hold the edge models' own weights: a's, and the permuted b's
    pb = apply_permutation(b, perm)
    for name, q in p.stems[0].named_parameters():
        assert torch.equal(q, a.get_submodule(name.rpartition(".")[0]).get_parameter(name.rpartition(".")[2]))
    for name, q in p.stems[1].named_parameters():
        assert torch.equal(q, pb.get_submodule(name.rpartition(".")[0]).get_parameter(name.rpartition(".")[2]))
    z = partial_zip(a, b, perm, layers=2)
    assert isinstance(z, PartialZip) and len(z.heads) == 2 and "last 2" in repr(z)


@torch.no_grad()
def test_repair_and_rescale_act_on_the_tail_only(x):
    a, b = make("vgg16", 0), make("vgg16", 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=2)
    pb = apply_permutation(b, perm)
    l, alpha = 5, 0.3
    tail = [n for n in repair_layers(a) if n in conv_linear_layers(a)[l:]]
    targets = target_stats([a, pb], [1 - alpha, alpha], x, layers=tail)
    for method in ("repair", "rescale"):
        p = preserve_first(a, b, perm, layers=l, alpha=alpha, normalize=method, data=x)
        got = layer_stats(p, x, layers=[f"tail.{n}" for n in tail])
        for n in tail:
            assert torch.allclose(got[f"tail.{n}"][1], targets[n][1], rtol=1e-3, atol=1e-5), (method, n)
            if method == "repair":
                assert torch.allclose(got[f"tail.{n}"][0], targets[n][0], rtol=1e-3, atol=1e-5), n
        for name, q in p.stems[0].named_parameters():  # the stems are untouched
            assert torch.equal(q, a.get_parameter(name))
    # precomputed targets give the same model
    p1 = preserve_first(a, b, perm, layers=l, alpha=alpha, normalize="repair", data=x)
    p2 = preserve_first(a, b, perm, layers=l, alpha=alpha, normalize="repair", data=x, targets=targets)
    assert close(p1(x), p2(x))


@torch.no_grad()
def test_bias_calibration_counts_from_the_first_merged_layer(x):
    a, b = make("vgg16", 0), make("vgg16", 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=2)
    pb = apply_permutation(b, perm)
    l, alpha = 4, 0.4
    p = preserve_first(a, b, perm, layers=l, alpha=alpha, normalize="bias_calibration")
    for j, n in enumerate(conv_linear_layers(a)[l:], start=1):
        want = (1 - alpha) ** j * a.get_submodule(n).bias + alpha ** j * pb.get_submodule(n).bias
        assert torch.allclose(p.tail.get_submodule(n).bias, want), n
        w = torch.lerp(a.get_submodule(n).weight, pb.get_submodule(n).weight, alpha)
        assert torch.allclose(p.tail.get_submodule(n).weight, w)


@torch.no_grad()
def test_reset_re_estimates_the_tail_batchnorms_only(x):
    a, b = make("resnet20", 0), make("resnet20", 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=2)
    p = preserve_first(a, b, perm, layers=6, normalize="reset", data=x)
    for name, buf in p.stems[0].named_buffers():
        assert torch.equal(buf, a.get_buffer(name)), name
    # the tail's BN statistics are the batch statistics of its inputs on x
    bn = p.tail.get_submodule("layer3.2.norm2")
    seen = {}
    h = p.tail.get_submodule("layer3.2.conv2").register_forward_hook(lambda m, i, o: seen.__setitem__("y", o))
    p(x)
    h.remove()
    # (earlier tail BNs normalize by the unbiased running variance in eval mode: agreement to ~1e-3)
    assert torch.allclose(bn.running_mean, seen["y"].mean((0, 2, 3)), atol=2e-3)
    assert torch.allclose(bn.running_var, seen["y"].var((0, 2, 3)), rtol=1e-2)


@torch.no_grad()
def test_cca_recovers_a_function_preserving_alignment_of_a_permuted_copy(x):
    a = make("vgg16", 0)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=4)
    copy = apply_permutation(a, perm)
    found = cca_matching(a, copy, x)
    assert isinstance(found, LinearAlignment)
    fresh = torch.randn(16, 1, 28, 28)
    assert close(found.apply(copy)(fresh), a(fresh), 1e-4)
    # the first group (no dead units) is exactly the inverse permutation matrix
    inv = perm.inverse().perms[0]
    assert torch.allclose(found[0], torch.eye(len(inv), dtype=torch.float64)[inv], atol=1e-6)
    for l in (0, 4, 9, 14):  # PFM composes with the CCA alignment
        assert close(preserve_first(a, copy, found, layers=l)(fresh), a(fresh), 1e-4), l


@torch.no_grad()
def test_cca_pfm_keeps_model_b_own_stem(x):
    """CCA's map does not commute with ReLU, so the aligned b is a different function; PFM's stem b is
    the original b plus the map T on its output, so l = L is still the true ensemble."""
    a, b = make("vgg16", 0), make("vgg16", 1)
    al = cca_matching(a, b, x)
    assert not close(al.apply(b)(x), b(x), 1e-3)
    assert close(preserve_first(a, b, al, layers=14)(x), 0.5 * (a(x) + b(x)))
    assert close(preserve_first(a, b, al, layers=0)(x), interpolate(a, al.apply(b), 0.5)(x))
    p = preserve_first(a, b, al, layers=6)
    assert len(list(p.stems[1].align.children())) == 1 and count_cost(p, x[:1])["params"] > count_cost(
        preserve_first(a, b, None, layers=6, data=x), x[:1])["params"]


@torch.no_grad()
def test_linear_alignment_of_a_permutation_is_the_permutation(x):
    a, b = make("vgg16", 0), make("vgg16", 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=6)
    la = LinearAlignment.from_permutation(perm)
    for k, v in apply_permutation(b, perm).state_dict().items():
        assert torch.allclose(la.apply(b).state_dict()[k], v, atol=1e-6), k


def test_cca_errors(x):
    a, b = make("resnet20", 0), make("resnet20", 1)
    with pytest.raises(UnsupportedOperationError, match="activation matching"):
        cca_matching(a, b, x)
    v0, v1, v2 = make("vgg16", 0), make("vgg16", 1), make("vgg16", 2)
    with pytest.raises(ValueError, match="reg"):
        cca_matching(v0, v1, x, reg=0)
    al = cca_matching(v0, v1, x)
    with pytest.raises(ValueError, match="another model_b"):
        al.apply(v2)
    with pytest.raises(ValueError, match="another model_b"):
        preserve_first(v0, v2, al, layers=3)


def test_errors(x):
    a, b = make("vgg16", 0), make("vgg16", 1)
    perm = random_permutation(permutation_spec(a, x[:1]), seed=0)
    for bad in (-1, 15, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"\[0, 14\]"):
            preserve_first(a, b, perm, layers=bad)
        with pytest.raises(ValueError, match=r"\[0, 14\]"):
            partial_zip(a, b, perm, layers=bad)
    with pytest.raises(ValueError, match="alpha"):
        preserve_first(a, b, perm, layers=3, alpha=1.5)
    r = make("resnet20", 0)
    with pytest.raises(ValueError, match="same architecture"):
        preserve_first(a, r, perm, layers=3)
    kw = dict(KW["vgg16"])
    wide = build_model(kw.pop("name"), **{**kw, "width": 0.125})
    with pytest.raises(ValueError, match="shape mismatch"):
        preserve_first(a, wide, perm, layers=3)
    other = random_permutation(permutation_spec(wide, x[:1]), seed=0)  # a permutation of another pair's spec
    with pytest.raises(ValueError, match="perm does not fit model_a"):
        preserve_first(a, b, other, layers=3)
    rperm = random_permutation(permutation_spec(r, x[:1]), seed=0)
    with pytest.raises(ValueError, match="another model"):
        preserve_first(a, b, rperm, layers=3)
    with pytest.raises(TypeError, match="Permutation"):
        preserve_first(a, b, [0, 1], layers=3)
    with pytest.raises(ValueError, match="unknown normalize"):
        preserve_first(a, b, perm, layers=3, normalize="REPAIR!")
    with pytest.raises(ValueError, match="needs data"):
        preserve_first(a, b, perm, layers=3, normalize="repair")
    with pytest.raises(ValueError, match="no BatchNorm"):
        preserve_first(a, b, perm, layers=3, normalize="reset", data=x)
    rb = make("resnet20", 1)
    with pytest.raises(ValueError, match="refuses BatchNorm"):
        preserve_first(r, rb, rperm, layers=3, normalize="bias_calibration")
    with pytest.raises(ValueError, match="needs data= or example_input="):
        preserve_first(a, b, None, layers=3)
    with pytest.raises(ValueError, match="batch axis"):
        count_cost(a, torch.tensor(1.0))


@torch.no_grad()
def test_restricted_activation_matching_equals_matching_the_first_layers_only(x):
    """AM computed once and restricted to the groups of the first l layers (Fig. 4 left) is AM of those layers."""
    from vfnb.matching import activation_matching
    a, b = make("vgg16", 0), make("vgg16", 1)
    full = activation_matching(a, b, x)
    for l in (0, 5, 14):
        assert full.restrict(l) == activation_matching(a, b, x, layers=l), l

