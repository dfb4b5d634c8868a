"""Paper §5.2: merging seen through the vanishing feature.

Permutation keeps the parameter scale (the scaling matrix W0 ⊘ W1 before and after weight matching),
REPAIR/RESCALE amplify the input-induced feature (VF curve before/after, and accuracy along α with the
reference statistics measured once), RESET on a merged VGG16-BN (Fig. 3C), LayerNorm's milder
vanishing, and linear MLPs with and without residual connections (Fig. 3D).

Every merged model is θ_α = (1−α)·θ₀ + α·π(θ₁), with π from ``cfg.alignment`` (weight matching by
default, as in the paper's Fig. 3), no post-merging normalization unless stated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config
from ..data import VisionData
from ..diagnose import VFCurve, bn_stats, scaling_matrix, vf_curve
from ..evaluate import barrier, evaluate
from ..merge import interpolate
from ..models import device_of
from ..normalize import layer_stats, repair, rescale, reset_bn_stats, weighted_stats
from ..structure import conv_linear_layers
from ..train import TrainConfig, recipe
from ..zoo import get_or_train, resolve_device
from .claims import Claims, all_of
from .common import (ALIGNMENT_NAMES, Merged, align, aligned, check_config, load_edges, match_data, merge_pair,
                     test_data)

#: The architectures of this chapter (labels of :data:`vfnb.chapters.common.ARCHS`).
ARCH_LABELS = ("VGG16", "VGG16-BN", "VGG16-LN", "ResNet20", "ResNet20-LN")


@dataclass
class MergingVFResult:
    """Everything the §5.2 chapter shows."""

    cfg: Config
    vgg: dict[str, Merged]                      # VGG16 merged by direct / wm / am
    scale_rows: list[dict[str, Any]]            # per layer: W0⊘W1 statistics, direct vs WM
    ratio_samples: dict[str, np.ndarray]        # W0/W1 entries of one layer, direct vs WM
    ratio_layer: str
    normalized: dict[str, tuple[float, VFCurve]]  # "WM", "WM + REPAIR", ..., "AM + RESCALE": (accuracy, curve)
    sweep: dict[str, dict[str, np.ndarray]]     # accuracy along α per method
    sweep_cost: dict[str, float]
    bn: Merged
    bn_before: dict[str, tuple[np.ndarray, np.ndarray]]
    bn_after: dict[str, tuple[np.ndarray, np.ndarray]]
    bn_reset: tuple[float, VFCurve]
    norms: dict[str, Merged]                    # VGG16-LN, ResNet20 (BN), ResNet20-LN merged by the alignment
    residual: dict[str, dict[str, np.ndarray]]  # Fig. 3D: accuracy along α per (net, alignment)
    residual_edges: dict[str, list[float]]
    n_test: int = 0                             # test images behind every accuracy


def _forward_seconds(model: nn.Module, data: VisionData) -> float:
    x = data.tensors(device_of(model))[0]
    with torch.no_grad():
        t = time.perf_counter()
        model.eval()(x)
        return time.perf_counter() - t


def mlp_configs(cfg: Config, residual: bool) -> list[TrainConfig]:
    """Fig. 3D's edge models: linear MLPs (``mlp_depth`` × ``mlp_width``, Table 2's MLP recipe, ``mlp_epochs``) on
    ``mlp_dataset``, with or without residual connections, one per seed."""
    return [recipe("mlp", cfg.profile, dataset=cfg.mlp_dataset, seed=s, epochs=cfg.mlp_epochs, n_train=cfg.n_train,
                   depth=cfg.mlp_depth, width=cfg.mlp_width, activation="none", residual=residual)
            for s in cfg.seeds[:2]]


def residual_mlps(cfg: Config, progress: bool = True
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[float]]]:
    """Fig. 3D: linear MLPs (``mlp_depth`` layers of width ``mlp_width``) with and without residual
    connections, trained on ``mlp_dataset`` and merged directly and by weight matching: test accuracy along α
    on its test images."""
    device = resolve_device(cfg.device)
    mcfg = cfg.replace(dataset=cfg.mlp_dataset)
    test, mdata = test_data(mcfg), match_data(mcfg)
    curves, edge_acc = {}, {}
    for residual in (False, True):
        net = "residual" if residual else "plain"
        edges = [get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
                 for c in mlp_configs(cfg, residual)]
        edge_acc[net] = [evaluate(e, test)["accuracy"] for e in edges]
        for method in ("direct", "wm"):
            partner = aligned(edges[1], align(edges[0], edges[1], method, mdata))
            acc = [evaluate(interpolate(edges[0], partner, a), test)["accuracy"] for a in cfg.alphas]
            curves[f"{net}, {ALIGNMENT_NAMES[method]}"] = {"alpha": np.array(cfg.alphas), "accuracy": np.array(acc)}
    return curves, edge_acc


def run(cfg: Config, progress: bool = True) -> MergingVFResult:
    """§5.2: permutation, REPAIR/RESCALE, RESET, LayerNorm and residual connections through the VF lens."""
    check_config(cfg, "merging_through_vf")
    torch.manual_seed(0)
    test, mdata = test_data(cfg), match_data(cfg)
    bar = tqdm(total=7, desc="§5.2", disable=not progress, leave=False)
    # permutation keeps the parameter scale
    vgg_edges = load_edges(cfg, "VGG16", test, progress)
    vgg = {m: merge_pair(cfg, vgg_edges, test, mdata, alignment=m) for m in ("direct", "wm", "am")}
    bar.update()
    e0, direct1, wm1 = vgg["wm"].edges[0], vgg["direct"].partner, vgg["wm"].partner
    layers = conv_linear_layers(e0)
    mods = [dict(m.named_modules()) for m in (e0, direct1, wm1)]
    scale_rows = []
    for l, n in enumerate(layers, start=1):
        d = scaling_matrix(mods[0][n].weight, mods[1][n].weight)
        w = scaling_matrix(mods[0][n].weight, mods[2][n].weight)
        scale_rows.append({"layer": l, "module": n,
                           "sign agreement, direct": d["sign agreement"],
                           "sign agreement, weight matching": w["sign agreement"],
                           "midpoint scale, direct": d["midpoint scale"],
                           "midpoint scale, weight matching": w["midpoint scale"]})
    ratio_layer = layers[len(layers) // 2]
    ratio_samples = {k: (mods[0][ratio_layer].weight / mods[i][ratio_layer].weight).detach().flatten().cpu().numpy()
                     for k, i in (("direct", 1), ("weight matching", 2))}
    bar.update()
    # REPAIR / RESCALE on the aligned VGG16s at α (WM and AM), then along α for cfg.alignment, with the
    # reference statistics (edge 0 and the aligned edge 1) measured once per alignment
    ref_stats, ref_time, normalized = {}, {}, {}
    for al in ("direct", "wm", "am"):
        if al != "direct" or cfg.alignment == "direct":
            t = time.perf_counter()
            ref_stats[al] = [layer_stats(vgg[al].edges[0], mdata), layer_stats(vgg[al].partner, mdata)]
            ref_time[al] = time.perf_counter() - t
    for al in ("wm", "am"):
        m = vgg[al]
        normalized[al.upper()] = (m.accuracy, m.curve)
        for name, fn in (("REPAIR", repair), ("RESCALE", rescale)):
            model = fn(m.merged, data=mdata, targets=weighted_stats(ref_stats[al], [1 - cfg.alpha, cfg.alpha]))
            normalized[f"{al.upper()} + {name}"] = (evaluate(model, test)["accuracy"], vf_curve(model, m.edge_fb, test))
    base, (s0, s1), ref_seconds = vgg[cfg.alignment], ref_stats[cfg.alignment], ref_time[cfg.alignment]
    bar.update()
    tag = cfg.alignment.upper()
    sweep: dict[str, list[float]] = {"direct": [], ALIGNMENT_NAMES[cfg.alignment]: [], f"{tag} + REPAIR": [],
                                     f"{tag} + RESCALE": []}  # one "direct" line when cfg.alignment is direct
    repair_seconds, seen = 0.0, [0]
    for a in tqdm(cfg.alphas, desc="α sweep", disable=not progress, leave=False):
        if cfg.alignment != "direct":
            sweep["direct"].append(evaluate(interpolate(e0, direct1, a), test)["accuracy"])
        m = interpolate(base.edges[0], base.partner, a)
        sweep[ALIGNMENT_NAMES[cfg.alignment]].append(evaluate(m, test)["accuracy"])
        tg = weighted_stats([s0, s1], [1 - a, a])
        # count the images REPAIR pushes through the model (deepcopy keeps the hook on its copy)
        hook = m.register_forward_pre_hook(lambda mod, inp: seen.__setitem__(0, seen[0] + len(inp[0])))
        t = time.perf_counter()
        rep = repair(m, data=mdata, targets=tg)
        repair_seconds += time.perf_counter() - t
        hook.remove()
        rep._forward_pre_hooks.clear()
        sweep[f"{tag} + REPAIR"].append(evaluate(rep, test)["accuracy"])
        resc = rescale(m, data=mdata, targets=tg)
        sweep[f"{tag} + RESCALE"].append(evaluate(resc, test)["accuracy"])
    fwd = _forward_seconds(base.merged, mdata)
    n_a, fwd = len(cfg.alphas), max(fwd, 1e-9)
    sweep_cost = {"one forward pass over the calibration data (s)": fwd,
                  "reference statistics, once (s)": ref_seconds,
                  f"REPAIR at {n_a} α points (s)": repair_seconds,
                  "REPAIR per α point, passes over the calibration data (counted)": seen[0] / len(mdata) / n_a,
                  "REPAIR per α point, wall clock in forward passes": repair_seconds / n_a / fwd,
                  "whole sweep (references + REPAIR), in forward passes": (ref_seconds + repair_seconds) / fwd}
    curves = {k: {"alpha": np.array(cfg.alphas), "accuracy": np.array(v)} for k, v in sweep.items()}
    bar.update()
    # RESET on a merged VGG16-BN (Fig. 3C)
    bn = merge_pair(cfg, load_edges(cfg, "VGG16-BN", test, progress), test, mdata)
    reset = reset_bn_stats(bn.merged, mdata)
    bn_reset = (evaluate(reset, test)["accuracy"], vf_curve(reset, bn.edge_fb, test))
    bar.update()
    # LayerNorm: milder vanishing
    norms = {k: merge_pair(cfg, load_edges(cfg, k, test, progress), test, mdata)
             for k in ("VGG16-LN", "ResNet20", "ResNet20-LN")}
    bar.update()
    residual, residual_edges = residual_mlps(cfg, progress=progress)
    bar.update()
    bar.close()
    return MergingVFResult(cfg=cfg, vgg=vgg, scale_rows=scale_rows, ratio_samples=ratio_samples,
                           ratio_layer=ratio_layer, normalized=normalized, sweep=curves, sweep_cost=sweep_cost, bn=bn,
                           bn_before=bn_stats(bn.merged), bn_after=bn_stats(reset), bn_reset=bn_reset, norms=norms,
                           residual=residual, residual_edges=residual_edges, n_test=len(test))


def claims(res: MergingVFResult) -> list[dict[str, str]]:
    """The paper's §5.2 claims, checked on this run (accuracy comparisons beyond the test-set noise,
    :mod:`vfnb.chapters.claims`)."""
    c = Claims(n=res.n_test or None)
    a = res.cfg.alpha
    rows = res.scale_rows
    sd = np.array([r["sign agreement, direct"] for r in rows])
    sw = np.array([r["sign agreement, weight matching"] for r in rows])
    md = np.array([r["midpoint scale, direct"] for r in rows])
    mw = np.array([r["midpoint scale, weight matching"] for r in rows])
    c.add("Weight matching brings the scaling matrix W0 ⊘ W1 closer to the all-ones matrix: more entries "
          "share their sign (on average, and in at least ¾ of the layers)",
          bool(sw.mean() > sd.mean() and (sw > sd).mean() >= 0.75),
          f"sign agreement, mean over layers: direct {sd.mean():.3f}, WM {sw.mean():.3f} "
          f"(WM higher in {int((sw > sd).sum())} of {len(rows)} layers)")
    c.add("…so the merged weights keep more of their scale (on average, and in at least ¾ of the layers)",
          bool(mw.mean() > md.mean() and (mw > md).mean() >= 0.75),
          f"‖W_0.5‖/mean‖W_i‖, mean over layers: direct {md.mean():.3f}, WM {mw.mean():.3f}")
    v = res.vgg
    c.add("Permutation mitigates the vanishing feature (VGG16: ε_L higher, accuracy higher than direct)",
          all_of(bool(v["wm"].eps_last > v["direct"].eps_last), c.greater(v["wm"].accuracy, v["direct"].accuracy)),
          f"ε_L direct {v['direct'].eps_last:.3g}, WM {v['wm'].eps_last:.3g}, AM {v['am'].eps_last:.3g}; "
          f"accuracy direct {v['direct'].accuracy:.3f}, WM {v['wm'].accuracy:.3f}, AM {v['am'].accuracy:.3f}")
    nz = res.normalized
    for name in ("REPAIR", "RESCALE"):
        verdicts, ev = [], []
        for al in ("WM", "AM"):
            (acc0, c0), (acc1, c1) = nz[al], nz[f"{al} + {name}"]
            verdicts += [bool(c1.bound[-1] > c0.bound[-1]), c.greater(acc1, acc0)]
            ev.append(f"{al}: ε_L {c0.bound[-1]:.3g} → {c1.bound[-1]:.3g}, accuracy {acc0:.3f} → {acc1:.3f}")
        claim = ("REPAIR amplifies the input-induced feature (ε_L up) and recovers accuracy" if name == "REPAIR" else
                 "RESCALE does the same without re-introducing the offset")
        c.add(claim + f" (VGG16, α={a:g}, after WM and after AM)", all_of(*verdicts), "; ".join(ev))
    c.add("RESCALE beats REPAIR at the midpoint (paper, CIFAR-10 VGG16)",
          all_of(*(c.greater(nz[f"{al} + RESCALE"][0], nz[f"{al} + REPAIR"][0]) for al in ("WM", "AM"))),
          "; ".join(f"{al}: RESCALE {nz[f'{al} + RESCALE'][0]:.3f}, REPAIR {nz[f'{al} + REPAIR'][0]:.3f} "
                    f"(±{c.margin(nz[f'{al} + RESCALE'][0], nz[f'{al} + REPAIR'][0]):.3f})" for al in ("WM", "AM")),
          paper="RESCALE ≈ 84 %, REPAIR ≈ 65 % (CIFAR-10 VGG16, WM)")
    std_b = np.mean([s.mean() for _, s in res.bn_before.values()])
    std_a = np.mean([s.mean() for _, s in res.bn_after.values()])
    mean_b = np.mean([np.abs(m).mean() for m, _ in res.bn_before.values()])
    dmean = np.mean([np.abs(ma - mb).mean() for (ma, _), (mb, _) in zip(res.bn_after.values(), res.bn_before.values())])
    c.add("Fig. 3C: RESET reduces the BatchNorm running std of the merged VGG16-BN", bool(std_a < std_b),
          f"channel-average running std over layers: {std_b:.3g} before, {std_a:.3g} after")
    c.add("…while leaving the running mean largely unchanged", bool(dmean < 0.5 * mean_b),
          f"mean |Δ running mean| {dmean:.3g} against mean |running mean| {mean_b:.3g}")
    acc_reset, c_reset = res.bn_reset
    c.add("RESET amplifies the input-induced feature (ε_L up) and recovers accuracy",
          all_of(bool(c_reset.bound[-1] > res.bn.eps_last), c.greater(acc_reset, res.bn.accuracy)),
          f"ε_L {res.bn.eps_last:.3g} → {c_reset.bound[-1]:.3g}; accuracy {res.bn.accuracy:.3f} → {acc_reset:.3f}")
    n = res.norms
    c.add("LayerNorm: the vanishing feature is milder (ε_L of the LN model above its counterpart's)",
          n["VGG16-LN"].eps_last > v[res.cfg.alignment].eps_last and n["ResNet20-LN"].eps_last > n["ResNet20"].eps_last,
          f"ε_L VGG16-LN {n['VGG16-LN'].eps_last:.3g} vs VGG16 {v[res.cfg.alignment].eps_last:.3g}; "
          f"ResNet20-LN {n['ResNet20-LN'].eps_last:.3g} vs ResNet20 (BN, no RESET) {n['ResNet20'].eps_last:.3g}")
    bars = {k: barrier(cv["alpha"], cv["accuracy"]) for k, cv in res.residual.items()}
    for m in ("direct", "weight matching"):
        p, r = bars[f"plain, {m}"], bars[f"residual, {m}"]
        c.add(f"Fig. 3D: residual connections help merging linear MLPs ({m}: smaller barrier)", bool(r < p),
              f"barrier plain {p:.3f}, residual {r:.3f}")
    cost = res.sweep_cost
    passes = cost["REPAIR per α point, passes over the calibration data (counted)"]
    wall = cost["REPAIR per α point, wall clock in forward passes"]
    c.add("An α sweep with REPAIR measures the references once, then costs at most 2 passes over the "
          "calibration data per α", bool(passes <= 2),
          f"{passes:g} pass(es) per α (counted); wall clock ≈ {wall:.2f}× one forward pass per α (hooks, "
          f"copy and trace included); references once: {cost['reference statistics, once (s)']:.2f} s")
    return c.table()


def alignment_table(res: MergingVFResult) -> list[dict[str, Any]]:
    """VGG16 merged directly, by weight matching and by activation matching: accuracy and ε_L."""
    return [m.summary() for m in res.vgg.values()]


def repair_table(res: MergingVFResult) -> list[dict[str, Any]]:
    """VGG16 midpoints after WM and AM, before and after REPAIR/RESCALE: accuracy and vanishing-feature numbers."""
    return [{"merged model": k, "accuracy": acc, "ε_L = E_L": float(c.bound[-1])}
            for k, (acc, c) in res.normalized.items()]


def reset_table(res: MergingVFResult) -> list[dict[str, Any]]:
    """The merged VGG16-BN before and after RESET: accuracy and vanishing-feature numbers."""
    bn, (acc, c) = res.bn, res.bn_reset
    return [{"merged model": f"VGG16-BN, {bn.alignment.upper()}", "accuracy": bn.accuracy,
             "ε_L = E_L": bn.eps_last},
            {"merged model": f"VGG16-BN, {bn.alignment.upper()} + RESET", "accuracy": acc,
             "ε_L = E_L": float(c.bound[-1])}]


def layernorm_table(res: MergingVFResult) -> list[dict[str, Any]]:
    """Merged models with and without LayerNorm (no post-merging normalization)."""
    return [res.vgg[res.cfg.alignment].summary()] + [m.summary() for m in res.norms.values()]


def cost_table(res: MergingVFResult) -> list[dict[str, Any]]:
    """Wall-clock cost of the α sweep with REPAIR (reference statistics measured once)."""
    return [{"quantity": k, "value": float(v)} for k, v in res.sweep_cost.items()]


def residual_table(res: MergingVFResult) -> list[dict[str, Any]]:
    """Fig. 3D in numbers: edge accuracy, merged accuracy at α and barrier per network and alignment."""
    rows = []
    for k, c in res.residual.items():
        net = k.split(",")[0]
        i = int(np.argmin(np.abs(c["alpha"] - res.cfg.alpha)))
        rows.append({"network": k, "edge accuracy": float(np.mean(res.residual_edges[net])),
                     f"accuracy at α={res.cfg.alpha:g}": float(c["accuracy"][i]),
                     "barrier": barrier(c["alpha"], c["accuracy"])})
    return rows
