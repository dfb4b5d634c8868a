"""One-shot pruning and post-pruning normalization (vfnb.pruning, paper §5.5)."""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from vfnb import build_model
from vfnb.data import VisionData
from vfnb.pruning import (PRUNE_METHODS, apply_masks, prunable_layers, prune, prune_scores, repair_pruned,
                          select_masks, weight_sparsity)


def tiny_data(n=40, seed=0, size=28):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return VisionData("mnist5k", images, torch.randint(0, 10, (n,), generator=g), (0.1307,), (0.3081,), 10)


def vgg(norm="none", seed=0, name="vgg11"):
    torch.manual_seed(seed)
    return build_model(name, in_channels=1, num_classes=10, norm=norm, width=0.0625, input_size=28).eval()


def mlp(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", in_features=784, depth=3, width=16, activation="relu").eval()


def odd_convnet(seed=0):
    """Convolutions with stride, dilation, groups and reflect padding, then a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2), nn.ReLU(),
        nn.Conv2d(6, 5, (3, 1), padding="same"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 10)).eval()


def weights(model):
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach() for n in prunable_layers(model)}


def n_pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


# ----------------------------------------------------------------------------------- exact sparsity

@pytest.mark.parametrize("scope", ["global", "layerwise", "row"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 1 / 3, 0.5, 0.9, 0.99])
def test_sparsity_is_exact(scope, sparsity):
    model = vgg()
    pruned, masks = prune(model, sparsity, "magnitude", scope=scope)
    total = sum(m.numel() for m in masks.values())
    assert n_pruned(masks) == round(sparsity * total)
    # random weights are never exactly 0, so the zeros in the model are the pruned weights
    assert weight_sparsity(pruned) == pytest.approx(round(sparsity * total) / total, abs=0)
    for name, m in masks.items():
        if scope == "layerwise":  # every layer within one weight of the request
            assert abs(int((~m).sum()) - sparsity * m.numel()) < 1
        if scope == "row":
            rows = (~m).reshape(m.shape[0], -1).sum(1).double()
            assert ((rows - sparsity * m[0].numel()).abs() < 1).all()


def test_layerwise_sparsity_is_uniform_and_global_is_not():
    model = vgg()
    _, glob = prune(model, 0.8, "magnitude", scope="global")
    _, layer = prune(model, 0.8, "magnitude", scope="layerwise")
    per_layer = [float((~m).float().mean()) for m in glob.values()]
    assert max(per_layer) - min(per_layer) > 0.1  # global pruning spreads the zeros unevenly
    assert all(abs(float((~m).float().mean()) - 0.8) < 0.01 for m in layer.values())


def test_ties_are_broken_deterministically_and_exactly():
    model = mlp()
    with torch.no_grad():
        for n, w in weights(model).items():
            w.fill_(0.5)  # every score ties
    for scope in ("global", "layerwise", "row"):
        a = prune(model, 0.37, "magnitude", scope=scope)[1]
        b = prune(model, 0.37, "magnitude", scope=scope)[1]
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert n_pruned(a) == round(0.37 * sum(m.numel() for m in a.values()))


# ----------------------------------------------------------------------------------- which weights are kept

def assert_top_kept(scores, masks, group):
    """Within every comparison group, each kept score is >= each pruned score."""
    if group == "global":
        s = torch.cat([scores[n].reshape(-1) for n in scores])
        k = torch.cat([masks[n].reshape(-1) for n in scores])
        groups = [(s, k)]
    elif group == "layerwise":
        groups = [(scores[n].reshape(-1), masks[n].reshape(-1)) for n in scores]
    else:
        groups = [(row_s, row_k) for n in scores
                  for row_s, row_k in zip(scores[n].reshape(len(scores[n]), -1), masks[n].reshape(len(masks[n]), -1))]
    for s, k in groups:
        if k.all() or (~k).all():
            continue
        assert s[k].min() >= s[~k].max()


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_magnitude_keeps_the_largest_weights(scope):
    model = vgg()
    _, masks = prune(model, 0.6, "magnitude", scope=scope)
    assert_top_kept({n: w.abs() for n, w in weights(model).items()}, masks, scope)


def unfolded_column_norms(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """‖X_j‖₂/√n of every input column of ``conv``, computed with one-hot kernels: a conv whose
    only weight is 1 at (c, i, j) outputs exactly input feature (c, i, j) at every position."""
    x = x.double()
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    cin, (kh, kw) = x.shape[1], conv.kernel_size
    out = torch.zeros(cin, kh, kw, dtype=torch.double)
    for c in range(cin):
        for i in range(kh):
            for j in range(kw):
                k = torch.zeros(1, cin, kh, kw, dtype=torch.double)
                k[0, c, i, j] = 1
                y = F.conv2d(x, k, stride=conv.stride, padding=padding, dilation=conv.dilation)
                out[c, i, j] = y.pow(2).sum()
    return (out / len(x)).sqrt()


def layer_inputs(model, x):
    got, mods = {}, dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda m, i, n=n: got.__setitem__(n, i[0].detach()))
          for n in prunable_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return got


def test_wanda_score_is_weight_times_input_norm_per_output_row():
    model, data = odd_convnet(), tiny_data(8)
    x = data.tensors()[0]
    inputs = layer_inputs(model, x)
    scores = prune_scores(model, "wanda", data, n_samples=None)
    mods = dict(model.named_modules())
    for name, s in scores.items():
        mod, w = mods[name], mods[name].weight.detach().double().abs()
        if isinstance(mod, nn.Conv2d):
            norms = unfolded_column_norms(mod, inputs[name])  # [in_channels, kh, kw]
            per_out = mod.in_channels // mod.groups
            expect = torch.stack([w[o] * norms[(o // (mod.out_channels // mod.groups)) * per_out:][:per_out]
                                  for o in range(mod.out_channels)])
        else:
            expect = w * inputs[name].double().pow(2).mean(0).sqrt()[None]
        torch.testing.assert_close(s, expect, rtol=1e-9, atol=1e-12)
    pruned, masks = prune(model, 0.5, "wanda", data, n_samples=None)
    assert_top_kept(scores, masks, "row")  # Wanda's comparison group: each output row
    assert n_pruned(masks) == round(0.5 * sum(m.numel() for m in masks.values()))


def test_wanda_differs_from_magnitude_when_inputs_differ_in_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(64, 4) * torch.tensor([100.0, 1.0, 1.0, 0.01])
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.1, 1.0, 1.0, 5.0]] * 3))
    _, wanda = prune(model, 0.25, "wanda", x)
    _, mag = prune(model, 0.25, "magnitude", scope="row")
    assert (~mag["1"][:, 0]).all() and mag["1"][:, 3].all()  # magnitude drops the small weight
    assert wanda["1"][:, 0].all() and (~wanda["1"][:, 3]).all()  # Wanda drops the one on a tiny input


def test_fisher_scores_match_per_sample_autograd():
    model, data = vgg("bn"), tiny_data(6)
    x, y = data.tensors()
    mods = dict(model.named_modules())
    names = prunable_layers(model)
    sq = {n: torch.zeros_like(mods[n].weight, dtype=torch.double) for n in names}
    for i in range(len(x)):  # one backward pass per sample: the definition of the empirical Fisher
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n in names:
            sq[n] += mods[n].weight.grad.double() ** 2
    model.zero_grad()
    scores = prune_scores(model, "fisher", data, n_samples=None, batch_size=5)
    for n in names:
        expect = 0.5 * sq[n] / len(x) * mods[n].weight.detach().double() ** 2
        torch.testing.assert_close(scores[n], expect, rtol=1e-3, atol=1e-6 * float(expect.abs().max()))
    _, masks = prune(model, 0.7, "fisher", data, n_samples=None)
    assert_top_kept(scores, masks, "global")


def test_calibration_subset_is_stratified_and_deterministic():
    sorted_data = tiny_data(100)
    sorted_data.labels = torch.arange(10).repeat_interleave(10)  # class-sorted, like the embedded MNIST
    a = prune_scores(mlp(), "fisher", sorted_data, n_samples=20, seed=3)
    b = prune_scores(mlp(), "fisher", sorted_data, n_samples=20, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    first = prune_scores(mlp(), "fisher", [(sorted_data.tensors()[0][:20], sorted_data.labels[:20])])
    assert not all(torch.allclose(a[n], first[n]) for n in a)  # not the first 20 (two classes only)


# ----------------------------------------------------------------------------------- what is never pruned

@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_biases_norms_and_the_input_model_are_untouched(method):
    model, data = vgg("bn"), tiny_data(16)
    before = copy.deepcopy(model.state_dict())
    pruned, masks = prune(model, 0.9, method, data)
    prunable = {f"{n}.weight" for n in masks}
    for k, v in pruned.state_dict().items():
        assert torch.equal(model.state_dict()[k], before[k]), f"the input model changed at {k}"
        if k not in prunable:
            assert torch.equal(v, before[k]), f"{k} is not a conv/linear weight but changed"
        else:
            kept = masks[k[:-len(".weight")]]
            assert torch.equal(v[kept], before[k][kept]) and (v[~kept] == 0).all()


def test_exclude_first_and_classifier():
    model = vgg("ln")
    all_layers = prunable_layers(model)
    pruned, masks = prune(model, 0.95, "magnitude", exclude_first=True, exclude_classifier=True)
    assert list(masks) == all_layers[1:-1] and all_layers[0] == "features.0" and all_layers[-1] == "classifier"
    assert torch.equal(pruned.features[0].weight, model.features[0].weight)
    assert torch.equal(pruned.classifier.weight, model.classifier.weight)
    total = sum(m.numel() for m in masks.values())
    assert weight_sparsity(pruned, list(masks)) == round(0.95 * total) / total


def test_explicit_layers_and_apply_masks():
    model = mlp()
    pruned, masks = prune(model, 0.5, "magnitude", layers=["layers.1"])
    assert list(masks) == ["layers.1"]
    assert torch.equal(pruned.layers[0].weight, model.layers[0].weight)
    again = apply_masks(model, masks)
    assert torch.equal(again.layers[1].weight, pruned.layers[1].weight)


# ----------------------------------------------------------------------------------- errors

def test_errors_name_the_problem():
    model, data = mlp(), tiny_data(8)
    for bad in (-0.1, 1.0, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            prune(model, bad)
    for method in ("wanda", "fisher"):
        with pytest.raises(ValueError, match="calibration data"):
            prune(model, 0.5, method)
    with pytest.raises(ValueError, match="unknown pruning method 'snip'"):
        prune(model, 0.5, "snip", data)
    with pytest.raises(ValueError, match="unknown pruning scope 'blockwise'"):
        prune(model, 0.5, "magnitude", scope="blockwise")
    with pytest.raises(ValueError, match="needs labels"):
        prune(model, 0.5, "fisher", data.tensors()[0])
    with pytest.raises(ValueError, match="no module 'layers.9'"):
        prune(model, 0.5, layers=["layers.9"])
    with pytest.raises(ValueError, match="only conv and linear"):
        prune(vgg("bn"), 0.5, layers=["features.1"])
    with pytest.raises(ValueError, match="no conv or linear layers"):
        prune(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="leaves none"):
        prune(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), 0.5, exclude_classifier=True)
    with pytest.raises(ValueError, match="n_samples"):
        prune(model, 0.5, "wanda", data, n_samples=0)
    with pytest.raises(ValueError, match="scope"):
        select_masks({"a": torch.ones(3)}, 0.5, "everything")


# ----------------------------------------------------------------------------------- post-pruning normalization

def preact_stats(model, x):
    """Per-channel (mean, std) of every conv's pre-activation (the norm after it, else the conv), computed
    here with hooks, independently of vfnb.normalize."""
    seq = list(model.features)
    points = [seq[i + 1] if i + 1 < len(seq) and not isinstance(seq[i + 1], (nn.ReLU, nn.MaxPool2d)) else m
              for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]
    got = []
    hs = [p.register_forward_hook(lambda m, i, o: got.append(o.detach().double())) for p in points]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return [(y.transpose(0, 1).reshape(y.shape[1], -1).mean(1), y.transpose(0, 1).reshape(y.shape[1], -1).std(1, unbiased=False))
            for y in got]


@pytest.mark.parametrize("norm", ["none", "ln"])
def test_repair_gives_the_pruned_model_the_unpruned_channel_stats(norm):
    model, data = vgg(norm), tiny_data(32)
    x = data.tensors()[0]
    pruned, masks = prune(model, 0.9, "magnitude")
    target, before = preact_stats(model, x), preact_stats(pruned, x)
    deep = before[-1][1] / target[-1][1]
    assert (deep < 0.5).any() or (deep > 2).any()  # pruning really moved the statistics
    fixed = repair_pruned(pruned, model, data, "repair", n_samples=None)
    for (m, s), (tm, ts) in zip(preact_stats(fixed, x), target):
        torch.testing.assert_close(m, tm, rtol=1e-3, atol=1e-4 * float(ts.max()))
        torch.testing.assert_close(s, ts, rtol=1e-3, atol=1e-4 * float(ts.max()))
    # the correction is folded into existing layers: same architecture, pruned weights still zero
    assert set(fixed.state_dict()) == set(model.state_dict())
    fixed_w = weights(fixed)
    assert all((fixed_w[n][~k] == 0).all() for n, k in masks.items())


def test_rescale_matches_std_only():
    model, data = vgg("none"), tiny_data(32)
    x = data.tensors()[0]
    pruned, _ = prune(model, 0.8, "magnitude")
    fixed = repair_pruned(pruned, model, data, "rescale", n_samples=None)
    after, target = preact_stats(fixed, x), preact_stats(model, x)
    torch.testing.assert_close(after[0][1], target[0][1], rtol=1e-3, atol=1e-6)  # first layer: exact std
    assert not torch.allclose(after[-1][0], target[-1][0], rtol=1e-2, atol=1e-3)  # means are not set


def test_reset_renormalizes_batchnorm_of_the_pruned_model():
    model, data = vgg("bn"), tiny_data(32)
    x = data.tensors()[0]
    pruned, masks = prune(model, 0.8, "magnitude")
    fixed = repair_pruned(pruned, model, data, "reset", n_samples=None)
    # with re-estimated statistics each BatchNorm output has mean β and std |γ| on the calibration data
    def bn_outputs(net):
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        outs = []
        hs = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().double())) for b in bns]
        with torch.no_grad():
            net(x)
        for h in hs:
            h.remove()
        return [(b, y.transpose(0, 1).reshape(y.shape[1], -1)) for b, y in zip(bns, outs)]

    # (tolerances: running_var is the unbiased estimate, and the deepest maps are 1×1 over 32 images)
    for b, flat in bn_outputs(fixed):
        torch.testing.assert_close(flat.mean(1), b.bias.detach().double(), atol=1e-2, rtol=0)
        torch.testing.assert_close(flat.std(1, unbiased=False), b.weight.detach().double().abs(), atol=1e-2, rtol=5e-2)
    stale = bn_outputs(pruned)[-1][1]  # before RESET the last BatchNorm is far from (β, |γ|)
    assert (stale.std(1) - 1).abs().max() > 0.5 or stale.mean(1).abs().max() > 0.5
    assert torch.equal(weights(fixed)["features.0"], weights(pruned)["features.0"])  # RESET changes no weight


@pytest.mark.parametrize("norm, method", [("none", "repair"), ("ln", "repair"), ("ln", "rescale"), ("bn", "reset"),
                                          ("bn", "repair")])
def test_sparsity_zero_then_repair_leaves_the_function_unchanged(norm, method):
    from vfnb.normalize import reset_bn_stats
    model, data = vgg(norm), tiny_data(32)
    if norm == "bn":  # a trained BN model's statistics describe its data; give the random one that property
        model = reset_bn_stats(model, data)
    pruned, masks = prune(model, 0.0, "magnitude")
    assert all(m.all() for m in masks.values())
    fixed = repair_pruned(pruned, model, data, method, n_samples=None)
    x = tiny_data(16, seed=5).tensors()[0]
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), model(x), rtol=1e-4, atol=1e-4 * float(model(x).abs().max()))


def test_precomputed_targets_and_stratified_calibration():
    from vfnb.pruning import pruning_targets
    model, data = vgg("ln"), tiny_data(60)
    pruned, _ = prune(model, 0.7, "magnitude")
    direct = repair_pruned(pruned, model, data, n_samples=20, seed=1)
    reused = repair_pruned(pruned, model, data, n_samples=20, seed=1,
                           targets=pruning_targets(model, data, n_samples=20, seed=1))
    for (k, a), b in zip(direct.state_dict().items(), reused.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_repair_pruned_errors():
    model, data = vgg("ln"), tiny_data(8)
    pruned, _ = prune(model, 0.5)
    with pytest.raises(ValueError, match="unknown post-pruning normalization 'renorm'"):
        repair_pruned(pruned, model, data, "renorm")
    with pytest.raises(ValueError, match="reset needs BatchNorm"):
        repair_pruned(pruned, model, data, "reset")
    with pytest.raises(ValueError, match="pruned copy of the original"):
        repair_pruned(pruned, vgg("none"), data)
    with pytest.raises(ValueError, match="calibration data"):
        repair_pruned(pruned, model, None)
    with pytest.raises(ValueError, match="n_samples"):
        repair_pruned(pruned, model, data, n_samples=-3)
