"""vfnb.chapters.common: the edge-model configurations and alignment shared by the chapters."""
from __future__ import annotations

import pytest
import torch

import vfnb
from vfnb.chapters import common
from vfnb.train import recipe


def test_edge_configs_follow_the_profile_recipe():
    cfg = vfnb.resolve("preliminaries", "cpu")
    configs = common.edge_configs(cfg)
    assert [c.seed for c in configs] == cfg.seeds
    for c in configs:
        assert c == recipe("vgg16", "cpu", seed=c.seed, norm="none", width=0.25)
        assert (c.epochs, c.lr, c.weight_decay, c.grad_clip) == (15, 0.1, 1e-2, 1.0)  # appendix A.4
    bn = common.edge_configs(cfg, model="resnet20", norm="ln", seeds=[3], width=common.width_for(cfg, "resnet20"))
    assert bn[0].model_kwargs == {"norm": "ln", "width": 1.0} and bn[0].seed == 3
    assert bn[0].schedule == "warmup_step"  # LayerNorm ResNets warm up (appendix A.3)
    assert (bn[0].lr, bn[0].batch_size, bn[0].weight_decay) == (0.05, 64, 5e-4)  # train.RESNET_LN_CNN


def test_every_book_architecture_has_distinct_zoo_keys():
    cfg = vfnb.resolve("preliminaries", "smoke")
    keys = {c.key for m, n in common.BOOK_ARCHITECTURES
            for c in common.edge_configs(cfg, model=m, norm=n, width=common.width_for(cfg, m))}
    assert len(keys) == 2 * len(common.BOOK_ARCHITECTURES)


def test_align_methods_and_errors():
    data = vfnb.calibration_subset(vfnb.load_dataset("mnist5k", "train"), 64)
    kw = dict(in_channels=1, num_classes=10, input_size=28, width=0.0625)
    torch.manual_seed(0)
    a = vfnb.build_model("vgg11", **kw).eval()
    perm = vfnb.random_permutation(vfnb.permutation_spec(a, vfnb.activations.example_input(data)), seed=3)
    b = vfnb.apply_permutation(a, perm)
    assert common.align(a, b, "direct", data) is None
    assert common.aligned(b, None) is b
    for method in ("wm", "am"):
        found = common.align(a, b, method, data)
        realigned = common.aligned(b, found)
        x = vfnb.activations.example_input(data)
        for (k, v), w in zip(a.state_dict().items(), realigned.state_dict().values()):
            assert torch.equal(v, w), f"{method}: {k} not restored"
        assert torch.allclose(a(x), realigned(x), atol=1e-6)
    with pytest.raises(ValueError, match="unknown alignment 'zip'"):
        common.align(a, b, "zip", data)


def test_resnet20_ln_gets_its_own_batch_and_weight_decay_unless_the_reader_sets_them():
    from vfnb.train import RESNET_LN_CNN
    cfg = vfnb.resolve("preliminaries", "cpu")
    ln = common.edge_configs(cfg, model="resnet20", norm="ln", width=1.0)[0]
    bn = common.edge_configs(cfg, model="resnet20", norm="bn", width=1.0)[0]
    assert (ln.batch_size, ln.weight_decay) == (RESNET_LN_CNN["cpu"]["batch_size"], RESNET_LN_CNN["cpu"]["weight_decay"])
    assert (bn.batch_size, bn.weight_decay) == (cfg.batch_size, cfg.weight_decay)
    assert ln.schedule == "warmup_step" and bn.schedule == "step"
    mine = common.edge_configs(vfnb.resolve("preliminaries", "cpu", weight_decay=1e-3, batch_size=32),
                               model="resnet20", norm="ln", width=1.0)[0]
    assert (mine.batch_size, mine.weight_decay) == (32, 1e-3)
    paper = common.edge_configs(vfnb.resolve("preliminaries", "paper"), model="resnet20", norm="ln", width=1.0)[0]
    assert (paper.batch_size, paper.weight_decay) == (128, 1e-4)


def test_arch_cfg_and_check_config():
    cfg = vfnb.resolve("vanishing_feature", "smoke")
    assert common.arch_cfg(cfg, "resnet20").model_width == cfg.resnet_width
    assert common.arch_cfg(cfg, "vgg16").model_width == cfg.model_width
    common.check_config(cfg, "vanishing_feature")
    with pytest.raises(ValueError, match=r"expected the config of chapter 'merging_through_vf'.*got 'vanishing_feature'"):
        common.check_config(cfg, "merging_through_vf")
    with pytest.raises(ValueError, match="got 'dict'"):
        common.check_config({}, "pruning")


def test_fig4_names_the_fix_it_applies():
    """§5.4 Fig. 4 left: a BatchNorm pair gets RESET, and its curves are keyed "reset" (they were keyed "repair")."""
    from vfnb.chapters.preserve_first_merging import fig4_curves, fig4_fix
    train = vfnb.load_dataset("mnist5k", "train")
    mdata, data = vfnb.calibration_subset(train, 64), vfnb.calibration_subset(vfnb.load_dataset("mnist5k", "test"), 64)
    kw = dict(in_channels=1, num_classes=10, input_size=28, width=0.0625)
    for norm, fix in (("bn", "reset"), ("none", "repair")):
        torch.manual_seed(0)
        a = vfnb.build_model("vgg11", norm=norm, **kw).eval()
        torch.manual_seed(1)
        b = vfnb.build_model("vgg11", norm=norm, **kw).eval()
        assert fig4_fix(a) == fix
        am = vfnb.activation_matching(a, b, mdata, example_input=vfnb.activations.example_input(mdata))
        got, curves = fig4_curves(a, b, am, data, mdata, [0, 9], 0.5)
        assert got == fix and set(curves) == {(m, n) for m in ("wm", "am") for n in ("none", fix)}
        if fix == "reset":  # the value is RESET's: recompute the fully permuted AM point
            merged = vfnb.interpolate(a, vfnb.apply_permutation(b, am), 0.5)
            expected = vfnb.evaluate(vfnb.reset_bn_stats(merged, mdata), data)["accuracy"]
            assert curves[("am", "reset")][1] == pytest.approx(expected)
