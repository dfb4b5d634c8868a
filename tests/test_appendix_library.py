"""Library pieces of the appendix chapters: magnitude degradation (A.5.2), per-layer costs (Tables 12-16), the
two initializations and the per-epoch snapshots (A.4), the results sidecars and the conclusion (§6)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vfnb
from vfnb import results
from vfnb.diagnose import scale_parameters, weight_norms
from vfnb.flops import count_cost, layer_table
from vfnb.models import build_model
from vfnb.train import TrainConfig, learning_rate, recipe, state_distance
from vfnb.zoo import get_or_train, info, snapshots


def test_scaling_a_linear_network_scales_g_by_lambda_to_the_l():
    torch.manual_seed(0)
    m = build_model("mlp", in_features=8, num_classes=4, depth=4, width=6, activation="none").eval()
    x = torch.randn(64, 8)
    from vfnb.closed_form import forward_activations
    lam, mu = 0.7, 1.0
    scaled = scale_parameters(m, lam, mu)
    base, new = forward_activations(m, x), forward_activations(scaled, x)
    zero_b, zero_n = forward_activations(m, torch.zeros(1, 8)), forward_activations(scaled, torch.zeros(1, 8))
    for l, (fb, fn, zb, zn) in enumerate(zip(base, new, zero_b, zero_n), 1):
        assert torch.allclose(fn - zn, lam ** l * (fb - zb), atol=1e-6)  # g -> λ^l g (float32 weights)
    # μ = λ^l-free check: with λ = 1, h scales by μ exactly
    h = forward_activations(scale_parameters(m, 1.0, 0.5), torch.zeros(1, 8))
    assert all(torch.allclose(a, 0.5 * b, atol=1e-6) for a, b in zip(h, zero_b))
    for bad in (float("nan"), True, "1"):
        with pytest.raises(ValueError, match="finite number"):
            scale_parameters(m, bad, 1.0)


def test_weight_norms_obey_the_triangle_inequality_and_reach_it_for_equal_models():
    torch.manual_seed(0)
    a, b = build_model("vgg11", width=0.0625), build_model("vgg11", width=0.0625)
    n = weight_norms(a, b, 0.5)
    assert np.all(n["merged"] <= n["triangle"] + 1e-9)
    assert 0.6 < float(np.median(n["merged"] / n["triangle"])) < 0.8  # independent: about 1/√2
    same = weight_norms(a, a, 0.3)
    assert np.allclose(same["merged"], same["triangle"])
    with pytest.raises(ValueError, match="one architecture"):
        weight_norms(a, build_model("vgg11", width=0.125))


@pytest.mark.parametrize("name,kw", [("vgg16", {"width": 0.125, "norm": "ln"}), ("resnet20", {"width": 0.25}),
                                     ("vit", {"depth": 2, "num_heads": 3, "patch_size": 8}),
                                     ("convnext", {"width": 0.25})])
def test_layer_table_adds_up_to_the_model(name, kw):
    m = build_model(name, **kw)
    x = torch.zeros(1, 3, 32, 32)
    rows = layer_table(m, x)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in m.parameters())
    assert sum(r["MACs"] for r in rows) == count_cost(m, x)["flops"] / 2
    assert all(r["input"] and r["output"] for r in rows)
    with pytest.raises(ValueError, match="batch of one"):
        layer_table(m, torch.zeros(2, 3, 32, 32))


def test_layer_table_shapes_of_a_conv():
    rows = layer_table(build_model("vgg11", width=0.125, in_channels=1, input_size=28), torch.zeros(1, 1, 28, 28))
    first = rows[0]
    assert (first["layer"], first["input"], first["output"]) == ("features.0", "1×32×32", "8×32×32")
    assert first["MACs"] == 8 * 32 * 32 * 9  # one multiply-accumulate per weight and output position


def test_inits_have_their_variances_and_bad_names_are_refused():
    torch.manual_seed(0)
    kn = build_model("vgg11", width=0.5).features[3].weight
    torch.manual_seed(0)
    un = build_model("vgg11", width=0.5, init="uniform").features[3].weight
    fan_in = kn.shape[1] * 9
    assert kn.var().item() == pytest.approx(2 / fan_in, rel=0.1)
    assert un.var().item() == pytest.approx(1 / (3 * fan_in), rel=0.1)
    assert build_model("resnet20", width=0.25, init="kaiming_normal").conv1.weight.std() > \
        build_model("resnet20", width=0.25).conv1.weight.std()
    with pytest.raises(ValueError, match="unknown init"):
        build_model("vgg11", init="xavier")


def test_warmup_cosine_ramps_then_decays_to_zero():
    c = TrainConfig(model="mlp", schedule="warmup_cosine", lr=0.1, epochs=5)
    assert learning_rate(c, 0, 0, 10) == pytest.approx(1e-6 + (0.1 - 1e-6) * 0.1)
    assert learning_rate(c, 0, 9, 10) == pytest.approx(0.1)
    assert learning_rate(c, 1, 0, 10) == pytest.approx(0.1)
    assert learning_rate(c, 3, 0, 10) == pytest.approx(0.05)
    assert learning_rate(c, 4, 9, 10) < 0.001
    lrs = [learning_rate(c, e, s, 10) for e in range(1, 5) for s in range(10)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_snapshots_keep_every_epoch_and_change_no_other_key(tmp_path):
    plain = recipe("mlp", "smoke", depth=2, width=8, epochs=2, n_train=64)
    snap = plain.replace(snapshots=True)
    assert "snapshots" not in plain.to_dict() and plain.key == recipe("mlp", "smoke", depth=2, width=8, epochs=2,
                                                                        n_train=64).key
    assert snap.key != plain.key
    with pytest.raises(ValueError, match="snapshots"):
        snapshots(plain, tmp_path)
    model = get_or_train(snap, cache_dir=tmp_path, progress=False)
    states = snapshots(snap, tmp_path)
    assert len(states) == 3
    torch.manual_seed(snap.seed)
    init = build_model("mlp", **info(snap, tmp_path)["model_kwargs"])
    assert all(torch.equal(states[0][k], v) for k, v in init.state_dict().items())
    assert all(torch.equal(states[-1][k], v) for k, v in model.state_dict().items())
    hist = info(snap, tmp_path)["history"]["distance_from_init"]
    assert len(hist) == 2 and hist[-1] == pytest.approx(state_distance(states[-1], states[0]))
    assert state_distance(states[1], states[1]) == 0.0
    with pytest.raises(ValueError, match="TrainConfig.snapshots"):
        TrainConfig(model="mlp", snapshots="yes")


def test_results_round_trip_atomically(tmp_path):
    cfg = vfnb.resolve("closed_forms", profile="smoke")
    path = results.record(cfg, "numbers", {"a": np.float32(0.5), "b": np.arange(3)}, tmp_path)
    assert path == tmp_path / "smoke" / "closed_forms.json"
    data = results.load("closed_forms", "smoke", tmp_path)
    assert data["results"]["numbers"] == {"a": 0.5, "b": [0, 1, 2]}
    assert data["parameters"]["n_inputs"] == cfg.n_inputs and data["vfnb"] == vfnb.__version__
    results.record(cfg, "more", [1], tmp_path)
    assert set(results.load("closed_forms", "smoke", tmp_path)["results"]) == {"numbers", "more"}
    results.record(cfg.replace(n_inputs=32), "more", [2], tmp_path)  # other parameters: a new run
    assert set(results.load("closed_forms", "smoke", tmp_path)["results"]) == {"more"}
    assert not list((tmp_path / "smoke").glob("*.tmp"))
    with pytest.raises(TypeError, match="JSON"):
        results.record(cfg, "x", object(), tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        results.load("closed_forms", "smoke", tmp_path)
    assert results.load("pruning", "smoke", tmp_path) is None


def test_conclusion_gathers_recorded_claims_in_reading_order(tmp_path):
    from vfnb import book
    from vfnb.chapters import claims, conclusion
    pages = {book.chapter_id(p): p for p in book.chapters()}
    rows = [{"claim": "c1", "holds here": "yes", "evidence": "e1"},
            {"claim": "c2", "holds here": "within noise", "evidence": "e2", "paper": "84 %"}]
    claims.show(vfnb.resolve("pruning", profile="smoke"), rows, tmp_path)
    claims.show(vfnb.resolve("linear_networks", profile="smoke"), rows[:1], tmp_path)
    cfg = vfnb.resolve("conclusion", profile="smoke", results_dir=str(tmp_path))
    got, runs = conclusion.gather(cfg, pages)
    assert [r["claim"] for r in got] == ["c1", "c1", "c2"]  # §4 before §5.5
    assert got[0]["page"] == "04_linear_networks.html" and got[2]["paper"] == "84 %"
    assert [r["verdict"] for r in got] == ["holds", "holds", "not shown at this scale"]
    not_run = [r for r in runs if r["recorded"] == "not run at this profile"]
    assert not_run and all("--profile smoke" in r["command"] for r in not_run)
    assert not any(r["chapter"].startswith("3.") for r in runs)  # no claims table there
    summary = conclusion.summary(got)
    assert summary[-1] == {"chapter": "all chapters", "holds": 2, "does not hold": 0, "not shown at this scale": 1}
    assert "<a href=\"05_5_pruning.html\">" in conclusion.claims_html(got).data
    from vfnb import plots
    fig, (ax,) = plots.figure()
    conclusion.plot_summary(ax, got)
    assert sum(p.get_width() for p in ax.patches) == 3  # every recorded claim is drawn once
    fig, (ax,) = plots.figure()
    conclusion.plot_summary(ax, [])  # nothing recorded yet: a note, no error
    assert not ax.patches
    with pytest.raises(ValueError, match="claims row"):
        claims.show(vfnb.resolve("pruning", profile="smoke"), [{"claim": "x"}], tmp_path)
    assert json.loads((tmp_path / "smoke" / "pruning.json").read_text())["results"]["claims"] == rows


@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_every_a85_parameter_set_is_a_valid_run_of_chapter_5_4(profile):
    from vfnb.chapters import preserve_first_merging as pfm
    for table, (_, params, _) in pfm.PARAMETER_SETS.items():
        cfg = vfnb.resolve("preserve_first_merging", profile=profile, **params)
        assert all(cfg[k] == v for k, v in params.items()), table
    rows = pfm.parameter_sets_table(profile)
    assert [r["paper"] for r in rows] == list(pfm.PARAMETER_SETS)
    assert all(r["command"].startswith(f"python -m vfnb run 05_4 --profile {profile}") for r in rows)


def test_a4_pairs_share_the_zoo_across_its_sweeps():
    from vfnb.chapters import training_recipe as tr
    cfg = vfnb.resolve("training_recipe", profile="cpu")
    assert tr.seed_pairs(cfg.seeds) == [(0, 1), (2, 3), (4, 5)]
    lr_sweep = tr.pair_configs(cfg, "VGG-LN", (0, 1), lr=0.01)
    init_kn = tr.pair_configs(cfg, "VGG-LN", (0, 1), lr=0.01, init="kaiming_normal")  # VGG's default init
    init_un = tr.pair_configs(cfg, "VGG-LN", (0, 1), lr=0.01, init="uniform")
    assert [c.key for c in lr_sweep] == [c.key for c in init_kn]
    assert init_un[0].model_kwargs["init"] == "uniform" and init_un[0].key != lr_sweep[0].key
    wd = tr.pair_configs(cfg, "VGG", (0, 1), weight_decay=cfg.weight_decay)
    lr = tr.pair_configs(cfg, "VGG", (0, 1), lr=cfg.lr)
    assert [c.key for c in wd] == [c.key for c in lr]  # the two sweeps meet at the chapter's recipe
    assert all(c.snapshots and c.model == "vgg11" and c.model_kwargs["width"] == 0.125 for c in wd)
    rebasin = tr.pair_configs(cfg.replace(model_width=cfg.rebasin_width), "vgg16", (0, 1),
                              **{k: v for k, v in tr.REBASIN.items() if k != "model"}, lr=0.001)
    c = rebasin[0]
    assert (c.schedule, c.batch_size, c.weight_decay, c.grad_clip, c.model_kwargs["init"], c.model_kwargs["norm"]) == \
        ("warmup_cosine", 100, 5e-4, 1.0, "uniform", "ln")
    resnet = tr.pair_configs(cfg, "ResNet20-LN", (0, 1))
    assert resnet[0].model == "resnet20" and resnet[0].schedule == "warmup_step" and resnet[0].model_kwargs["width"] == 0.5
