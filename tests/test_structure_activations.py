"""The shared homes of the redesign: structure (traced once), activations (capture and moments), the
Fix vocabulary, Permutation.restrict, permute_stats, RESET of a sub-network, and the vanishing-feature
curve of a PFM model; plus the rule that no vfnb module imports another module's private name."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vfnb
from vfnb import activations, structure
from vfnb.data import VisionData
from vfnb.normalize import Fix

MNIST = dict(in_channels=1, input_size=28)
ROOT = Path(__file__).resolve().parents[1]


def data(n: int = 32, seed: int = 0) -> VisionData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return VisionData("mnist5k", images, torch.arange(n) % 10, (0.1307,), (0.3081,), 10)


def model(name: str, seed: int, norm: str = "none", width: float = 0.0625) -> nn.Module:
    torch.manual_seed(seed)
    m = vfnb.build_model(name, norm=norm, width=width, **MNIST).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(0.0, 0.2)
    return m


# --------------------------------------------------------------------------- structure
def test_structure_counts_layers_as_the_paper() -> None:
    s = vfnb.structure_of(model("vgg16", 0))
    assert s.num_layers == 14 and not s.residual
    assert s.layers == tuple(s.all_layers)
    assert [s.depth[n] for n in s.layers] == list(range(1, 15))
    r = vfnb.structure_of(model("resnet20", 0, "bn", 0.25))
    assert r.num_layers == 20 and r.residual
    assert len(r.all_layers) == 22  # two shortcut convs are not counted ...
    shortcuts = [n for n in r.all_layers if n not in r.layers]
    assert all(1 < r.depth[n] < 20 for n in shortcuts)  # ... but have the depth of the block they run beside
    assert all(r.point[n] != n for n in r.layers[:-1])  # every conv is followed by its BatchNorm
    assert r.repair_layers() == list(r.layers[1:-1])


def test_the_cut_splits_the_graph_after_layer_l() -> None:
    m = model("vgg16", 0)
    s = vfnb.structure_of(m)
    for l in (0, 5, 14):
        c = structure.cut(m, s.graph.graph, l)
        assert c.front_layers == s.layers[:l] and c.back_layers == s.layers[l:]
        assert len(c.crossing) == 1


def test_layer_count_checks_name_the_limit() -> None:
    with pytest.raises(ValueError, match=r"integer in \[0, 14\]"):
        structure.check_layer_count(15, 14)
    with pytest.raises(ValueError, match="integer"):
        structure.check_layer_count(True, 14)


# --------------------------------------------------------------------------- activations
def test_cross_moments_match_numpy_correlations() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 500, generator=g, dtype=torch.float64), torch.randn(4, 500, generator=g, dtype=torch.float64)
    y[1] = 2 * x[2] + 0.1 * y[1]
    m = activations.CrossMoments(4, torch.device("cpu"))
    for i in range(0, 500, 128):  # streamed in uneven chunks
        m.add(x[:, i:i + 128], y[:, i:i + 128])
    expected = np.corrcoef(x.numpy(), y.numpy())[:4, 4:]
    assert np.allclose(m.corr().numpy(), expected, atol=1e-9)


def test_moments_merge_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(70, 3, 5, 5, generator=g)
    acc = None
    for part in torch.split(y, 16):
        acc = activations.merge_moments(acc, activations.batch_moments(part, 1))
    n, mean, var = acc
    assert n == 70 * 25
    assert torch.allclose(mean, y.double().mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(var, y.double().var((0, 2, 3), correction=0), atol=1e-5)


def test_collect_paired_sees_the_same_activations_as_a_forward_pass() -> None:
    a, b, d = model("vgg11", 0), model("vgg11", 1), data()
    spec = vfnb.permutation_spec(a, d.tensors()[0][:1])
    stats = activations.collect_paired(a, b, spec, [0], activations.batches(d, 8, a), activations.JointMoments)
    (key, m), = [(k, v) for k, v in stats.items() if k[0] == 0]
    out = {}
    node = key[1]
    # the captured node's values, from a plain fx interpreter run of each model on its own
    for which, net in (("a", a), ("b", b)):
        traced = vfnb.structure.trace(net)
        vals = {}

        class Grab(torch.fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                if n.name == node:
                    vals["v"] = r
                return r
        Grab(traced).run(activations.to_model(d.tensors()[0], net))
        out[which] = vals["v"].movedim(1, 0).reshape(spec.groups[0].size, -1).double()
    assert m.n == out["a"].shape[1]
    assert torch.allclose(m.s, torch.cat([out["a"].sum(1), out["b"].sum(1)]), rtol=1e-6, atol=1e-6)
    cross = out["a"] @ out["b"].T
    assert torch.allclose(m.ss[:len(cross), len(cross):], cross, rtol=1e-6, atol=1e-6)


def test_batches_follow_the_model_dtype_and_stratify() -> None:
    d = data(40)
    m64 = model("vgg11", 0).double()
    xs = list(activations.batches(d, 16, m64))
    assert [len(x) for x in xs] == [16, 16, 8] and all(x.dtype == torch.float64 for x in xs)
    assert len(activations.inputs(d, 10)) == 10
    with pytest.raises(ValueError, match="needs labels"):
        list(activations.labelled_batches(d.tensors()[0], need_labels=True))


# --------------------------------------------------------------------------- Fix, restrict, permute_stats
def test_fix_vocabulary() -> None:
    assert Fix.parse(None) is Fix.NONE and Fix.parse("REPAIR") is Fix.REPAIR
    assert Fix.parse("bias calibration") is Fix.BIAS_CALIBRATION and Fix.parse(Fix.RESET) is Fix.RESET
    assert Fix.REPAIR == "repair" and Fix.RESCALE.label == "RESCALE" and Fix.NONE.label == "no normalization"
    assert len({f.label for f in Fix}) == len(Fix)
    with pytest.raises(ValueError, match="unknown fix 'renorm'"):
        Fix.parse("renorm")
    with pytest.raises(ValueError, match="choose one of 'repair', 'rescale', 'reset'"):
        vfnb.repair_pruned(model("vgg11", 0), model("vgg11", 0), data(), method="bias_calibration")


def test_restrict_equals_matching_only_the_first_layers() -> None:
    a, b, d = model("vgg11", 0), model("vgg11", 1), data()
    full = vfnb.activation_matching(a, b, d)
    for l in (0, 3, 8):
        assert full.restrict(l) == vfnb.activation_matching(a, b, d, layers=l)
    with pytest.raises(ValueError, match="integer in"):
        full.restrict(full.spec.num_layers + 1)


def test_permute_stats_equals_measuring_the_permuted_model() -> None:
    a, d = model("vgg11", 0), data()
    perm = vfnb.random_permutation(vfnb.permutation_spec(a, d.tensors()[0][:1]), 5)
    direct = vfnb.layer_stats(vfnb.apply_permutation(a, perm), d)
    derived = vfnb.permute_stats(vfnb.layer_stats(a, d), perm)
    for n in direct:
        assert torch.allclose(direct[n][0], derived[n][0], atol=1e-6)
        assert torch.allclose(direct[n][1], derived[n][1], atol=1e-6)


# --------------------------------------------------------------------------- interpolation, RESET, VF curve
def test_bias_calibration_is_an_option_of_interpolate() -> None:
    a, b = model("vgg11", 0), model("vgg11", 1)
    plain, cal = vfnb.interpolate(a, b, 0.3), vfnb.interpolate(a, b, 0.3, bias_calibration=True)
    assert torch.equal(vfnb.calibrate_bias(a, b, 0.3).classifier.bias, cal.classifier.bias)
    layers = vfnb.conv_linear_layers(a)
    for l, name in enumerate(layers, start=1):
        ma, mb, mc = a.get_submodule(name), b.get_submodule(name), cal.get_submodule(name)
        assert torch.allclose(mc.bias, 0.7 ** l * ma.bias + 0.3 ** l * mb.bias)
        assert torch.equal(mc.weight, plain.get_submodule(name).weight)
    shifted = vfnb.interpolate(a, b, 0.3, bias_calibration=True, offset=3)
    assert torch.equal(shifted.get_submodule(layers[2]).bias, plain.get_submodule(layers[2]).bias)
    first = a.get_submodule(layers[3])
    assert torch.allclose(shifted.get_submodule(layers[3]).bias, 0.7 * first.bias + 0.3 * b.get_submodule(layers[3]).bias)


def test_reset_of_a_part_leaves_the_rest_alone() -> None:
    a, b, d = model("vgg11", 0, "bn"), model("vgg11", 1, "bn"), data()
    perm = vfnb.identity_permutation(vfnb.permutation_spec(a, d.tensors()[0][:1]))
    pfm = vfnb.preserve_first(a, b, perm, 3)
    stem_bn = next(m for m in pfm.stems[0].modules() if isinstance(m, nn.BatchNorm2d))
    tail_bn = next(m for m in pfm.tail.modules() if isinstance(m, nn.BatchNorm2d))
    before = stem_bn.running_mean.clone(), tail_bn.running_mean.clone()
    out = vfnb.reset_bn_stats(pfm, d, part="tail")
    new_stem = next(m for m in out.stems[0].modules() if isinstance(m, nn.BatchNorm2d))
    new_tail = next(m for m in out.tail.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(new_stem.running_mean, before[0]) and not torch.equal(new_tail.running_mean, before[1])
    assert torch.equal(stem_bn.running_mean, before[0]) and torch.equal(tail_bn.running_mean, before[1])  # a copy
    assert not out.training and not any(m.training for m in out.modules())
    with pytest.raises(ValueError, match="no submodule 'body'"):
        vfnb.reset_bn_stats(pfm, d, part="body")


def test_vf_curve_of_a_pfm_model_is_one_on_preserved_layers() -> None:
    a, b, d = model("vgg11", 0), model("vgg11", 1), data()
    perm = vfnb.activation_matching(a, b, d)
    pfm = vfnb.preserve_first(a, b, perm, 4)
    curve = vfnb.vf_curve(pfm, [a, vfnb.apply_permutation(b, perm)], d)
    reference = vfnb.vf_curve(a, [a, vfnb.apply_permutation(b, perm)], d)
    assert curve.layers == reference.layers
    stem = {n for n, _ in pfm.stems[0].named_modules()}
    preserved = [i for i, n in enumerate(curve.layers) if n in stem]
    assert preserved and np.allclose(curve.ratio[preserved], 1.0, atol=1e-6)
    merged = vfnb.vf_curve(vfnb.interpolate(a, vfnb.apply_permutation(b, perm), 0.5),
                           [a, vfnb.apply_permutation(b, perm)], d)
    assert curve.layers == merged.layers


# --------------------------------------------------------------------------- module boundaries
def test_no_module_imports_another_modules_private_name() -> None:
    offenders = []
    for path in sorted((ROOT / "vfnb").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in {"graph", "matching", "normalize", "pfm", "cca", "zipit",
                                                               "pruning", "diagnose", "merge", "structure",
                                                               "activations", "validate", "train", "zoo", "config",
                                                               "book", "plots", "widgets", "common", "data"}:
                    offenders.append(f"{path.relative_to(ROOT)}: {base.id}.{node.attr}")
    assert not offenders, offenders
