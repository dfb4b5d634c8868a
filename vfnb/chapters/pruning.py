"""Paper §5.5 and appendix A.7: the vanishing feature in one-shot pruning, and post-pruning
normalization.

One trained VGG16-LN and one VGG16-BN (the zoo's edge models, seed ``cfg.seed``) are pruned in one
shot by each pruner of ``cfg.pruners`` at every sparsity of ``cfg.sparsities``, and normalized
afterwards with the unpruned model as the only reference: REPAIR for the LN model, RESET for the
BN model. Calibration images (for Wanda, Fisher and the normalization) come from the training set
(``common.match_data``); accuracy, logits and the vanishing-feature bound are measured on test
images.
"""
from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config
from ..data import calibration_subset
from ..diagnose import feature_bias, logit_stats, vf_curve
from ..evaluate import evaluate
from ..normalize import Fix
from ..plots import color
from ..pruning import REPAIR_METHODS, apply_masks, prune_scores, pruning_targets, repair_pruned, select_masks
from ..train import TrainConfig, recipe
from ..zoo import get_or_train, info, resolve_device
from .claims import TIE, Claims, all_of
from .common import check_config, edge_configs, edge_models, match_data, test_data

#: Pruner name -> (scoring method, scope) of :func:`vfnb.prune`.
PRUNERS: dict[str, tuple[str, str]] = {"magnitude": ("magnitude", "global"),
                                       "magnitude-layerwise": ("magnitude", "layerwise"),
                                       "wanda": ("wanda", "row"), "fisher": ("fisher", "global")}
PRUNER_LABELS = {"magnitude": "global magnitude", "magnitude-layerwise": "layerwise magnitude",
                 "wanda": "Wanda", "fisher": "diagonal Fisher"}
#: The two models of the chapter: norm -> the post-pruning normalization it gets.
SETTINGS: dict[str, Fix] = {"ln": Fix.REPAIR, "bn": Fix.RESET}
#: The model the sparsity explorer shows (diagnosed at every grid point; the other only at cfg.sparsity).
EXPLORED = "ln"


@dataclass
class Diagnosis:
    """Logit statistics and the vanishing-feature curve of one pruned model, before/after the fix."""

    logits: dict[str, Any]
    vf: dict[str, Any]


@dataclass
class PruningResult:
    """Everything the §5.5 chapter shows. Keys: norm ("ln"/"bn") and pruner name."""

    cfg: Config
    models: dict[str, nn.Module]
    base: dict[str, dict[str, float]]                          # unpruned accuracy/loss per norm
    sparsities: list[float]
    accuracy: dict[tuple[str, str], dict[str, np.ndarray]]     # (norm, pruner) -> {"before", "after"}
    diagnosis: dict[tuple[str, str, float], Diagnosis]         # (norm, pruner, sparsity): every grid
                                                               # point of EXPLORED, cfg.sparsity of the other
    base_logits: dict[str, Any]
    calibration: dict[tuple[str, str], dict[str, list]]        # (norm, pruner) -> {"n", "accuracy"}
    settings: dict[str, str] = field(default_factory=lambda: dict(SETTINGS))  # norm -> fix actually run
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: Counter = field(default_factory=Counter)  # normalization warnings (e.g. dead channels), counted
    n_test: int = 0                                     # test images behind every accuracy
    convnext: "ConvNeXtResult | None" = None            # appendix A.7: Wanda on a ConvNeXt

    @property
    def explored(self) -> str:
        """The model diagnosed at every grid point (the explorer's)."""
        return EXPLORED if EXPLORED in self.settings else next(iter(self.settings))

    @property
    def pruners(self) -> list[str]:
        return list(self.cfg.pruners)

    def fix(self, norm: str) -> Fix:
        return Fix.parse(self.settings[norm], REPAIR_METHODS, "post-pruning normalization")

    def label(self, norm: str) -> str:
        return f"{self.cfg.model.upper()}-{norm.upper()}"

    def at(self, norm: str, pruner: str, sparsity: float) -> dict[str, float]:
        """Accuracy before and after the fix at one grid sparsity."""
        i = self.sparsities.index(sparsity)
        c = self.accuracy[(norm, pruner)]
        return {"before": float(c["before"][i]), "after": float(c["after"][i])}


def _check(cfg: Config) -> None:
    check_config(cfg, "pruning")


def sparsity_grid(cfg: Config) -> list[float]:
    """``cfg.sparsities`` with ``cfg.sparsity`` added if it is missing (sorted)."""
    grid = [float(s) for s in cfg.sparsities]
    if not any(abs(s - cfg.sparsity) < 1e-12 for s in grid):
        grid = sorted(grid + [float(cfg.sparsity)])
    return grid


def _nearest(grid: list[float], s: float) -> float:
    return min(grid, key=lambda g: abs(g - s))


def run(cfg: Config, progress: bool = True, settings: dict[str, str] | None = None) -> PruningResult:
    """Load the two models, prune them at every grid point with every pruner, normalize, evaluate,
    diagnose, and measure the effect of the calibration-set size (appendix A.7).

    Warnings of the normalization (channels that pruning left without variance, whose scale
    REPAIR cannot set) are counted in ``result.warnings`` instead of flooding the page.
    ``settings`` ({norm: "repair" | "rescale" | "reset"}) replaces the chapter's two models.
    """
    _check(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _run(cfg, progress, dict(SETTINGS if settings is None else settings))
        res.convnext = run_convnext(cfg, progress) if settings is None else None
    for w in caught:
        res.warnings[f"{w.category.__name__}: " + re.sub(r"\d+ of \d+", "k of n", str(w.message).split(";")[0])[:160]] += 1
    return res


def _run(cfg: Config, progress: bool, settings: dict[str, str]) -> PruningResult:
    bad = {k: v for k, v in settings.items() if k not in ("none", "ln", "bn") or v not in REPAIR_METHODS}
    if bad or not settings:
        raise ValueError(f"settings must map norms (none, ln, bn) to repair, rescale or reset, got {settings}")
    torch.manual_seed(0)
    test, pool = test_data(cfg), match_data(cfg)
    calib = calibration_subset(pool, min(cfg.n_calib, len(pool)), seed=0)
    diag = calibration_subset(test, min(cfg.n_diag, len(test)), seed=0)
    grid = sparsity_grid(cfg)
    seconds: dict[str, float] = {"prune": 0.0, "normalize": 0.0, "evaluate": 0.0, "diagnose": 0.0}
    models, base, base_logits, accuracy, diagnosis, calibration = {}, {}, {}, {}, {}, {}
    explored = EXPLORED if EXPLORED in settings else next(iter(settings))
    bar = tqdm(total=len(settings) * len(cfg.pruners) * len(grid), desc="prune", disable=not progress, leave=False)
    for norm, fix in settings.items():
        model = edge_models(cfg, norm=norm, seeds=[cfg.seed], progress=progress)[0].eval()
        models[norm] = model
        base[norm] = evaluate(model, test)
        base_logits[norm] = logit_stats(model, diag)
        ref_fb = feature_bias(model, diag)
        targets = pruning_targets(model, calib, n_samples=None) if fix != "reset" else None
        for pruner in cfg.pruners:
            method, scope = PRUNERS[pruner]
            t = time.perf_counter()
            scores = prune_scores(model, method, calib, n_samples=None)
            seconds["prune"] += time.perf_counter() - t
            before, after = [], []
            for s in grid:
                t = time.perf_counter()
                pruned = apply_masks(model, select_masks(scores, s, scope))
                seconds["prune"] += time.perf_counter() - t
                t = time.perf_counter()
                fixed = repair_pruned(pruned, model, calib, fix, n_samples=None, targets=targets)
                seconds["normalize"] += time.perf_counter() - t
                t = time.perf_counter()
                before.append(evaluate(pruned, test)["accuracy"])
                after.append(evaluate(fixed, test)["accuracy"])
                seconds["evaluate"] += time.perf_counter() - t
                if norm == explored or s == cfg.sparsity:
                    t = time.perf_counter()
                    diagnosis[(norm, pruner, s)] = Diagnosis(
                        logits={"pruned": logit_stats(pruned, diag), "fixed": logit_stats(fixed, diag)},
                        vf={"pruned": vf_curve(pruned, [ref_fb], diag), "fixed": vf_curve(fixed, [ref_fb], diag)})
                    seconds["diagnose"] += time.perf_counter() - t
                bar.update()
            accuracy[(norm, pruner)] = {"before": np.array(before), "after": np.array(after)}
            calibration[(norm, pruner)] = _calibration_sizes(cfg, model, scores, scope, fix, pool, test)
    bar.close()
    return PruningResult(cfg=cfg, models=models, base=base, sparsities=grid, accuracy=accuracy,
                         diagnosis=diagnosis, base_logits=base_logits, calibration=calibration, settings=settings,
                         seconds=seconds, n_test=len(test))


def _calibration_sizes(cfg: Config, model: nn.Module, scores: dict, scope: str, fix: str, pool: Any,
                       test: Any) -> dict[str, list]:
    """Appendix A.7: accuracy after the fix at ``cfg.sparsity`` with each calibration size (the
    same stratified subset for the unpruned and the pruned model), and with the whole pool."""
    pruned = apply_masks(model, select_masks(scores, cfg.sparsity, scope))
    sizes = sorted({n for n in cfg.calib_sizes if n < len(pool)}) + [len(pool)]
    acc = []
    for n in sizes:
        fixed = repair_pruned(pruned, model, pool, fix, n_samples=n, seed=0)  # one pass over all n images
        acc.append(evaluate(fixed, test)["accuracy"])
    return {"n": sizes, "accuracy": acc}


# ------------------------------------------------------------------------------------------ A.7 ConvNeXt
#: Appendix A.7's ConvNeXt pruners: Wanda (per output row, its own comparison group) and layerwise magnitude.
CONVNEXT_PRUNERS = ("wanda", "magnitude-layerwise")
#: The ConvNeXt's initial layer scale and weight decay. With ``build_model``'s default scale 0.1, or with the book's
#: strong weight decay (1e-2), the trained blocks' layer scales end so small that pruning even 99 % of their linear
#: weights changed no prediction (measured at cpu, width 0.5, 10 epochs: 0.902 and 0.904 test accuracy at every
#: sparsity), which says nothing about pruning. A scale of 1.0 with weight decay 5e-4 keeps the blocks in use.
CONVNEXT_LAYER_SCALE = 1.0
CONVNEXT_WEIGHT_DECAY = 5e-4


@dataclass
class ConvNeXtResult:
    """Appendix A.7: a ConvNeXt's linear layers pruned by Wanda and layerwise magnitude, before and after REPAIR."""

    config: TrainConfig
    layers: list[str]                                  # the pruned linear layers
    pruned_fraction: float                             # their share of the model's parameters
    base: float                                        # unpruned accuracy
    sparsities: list[float]
    accuracy: dict[str, dict[str, np.ndarray]]          # pruner -> {"before", "after"}


def convnext_config(cfg: Config) -> TrainConfig:
    """The ConvNeXt of appendix A.7 (``build_model("convnext")`` at ``convnext_width``), trained with the chapter's
    CNN recipe for ``convnext_epochs``, with :data:`CONVNEXT_LAYER_SCALE` and :data:`CONVNEXT_WEIGHT_DECAY`."""
    return recipe("convnext", cfg.profile, dataset=cfg.dataset, seed=cfg.seed, epochs=cfg.convnext_epochs,
                  lr=cfg.lr, weight_decay=CONVNEXT_WEIGHT_DECAY, batch_size=cfg.batch_size, n_train=cfg.n_train,
                  width=cfg.convnext_width, layer_scale=CONVNEXT_LAYER_SCALE)


def convnext_layers(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of a ConvNeXt but the classifier: the blocks' pointwise layers (the stem is a conv)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[:-1]


def run_convnext(cfg: Config, progress: bool = True) -> ConvNeXtResult:
    """Appendix A.7: prune the linear layers of a trained ConvNeXt (not the first embedding, not the classifier)
    at every sparsity, each layer on its own, with Wanda and magnitude; then REPAIR every conv/linear layer with
    the unpruned model's statistics on the calibration images."""
    config = convnext_config(cfg)
    model = get_or_train(config, cache_dir=cfg.cache_dir, data_root=cfg.data_root,
                         device=resolve_device(cfg.device), progress=progress).eval()
    test, pool = test_data(cfg), match_data(cfg)
    calib = calibration_subset(pool, min(cfg.n_calib, len(pool)), seed=0)
    layers = convnext_layers(model)
    modules = dict(model.named_modules())
    fraction = sum(modules[n].weight.numel() for n in layers) / sum(p.numel() for p in model.parameters())
    targets = pruning_targets(model, calib, n_samples=None)
    grid = sparsity_grid(cfg)
    accuracy = {}
    for pruner in tqdm(CONVNEXT_PRUNERS, desc="ConvNeXt pruners", disable=not progress, leave=False):
        method, scope = PRUNERS[pruner]
        scores = prune_scores(model, method, calib, layers=layers, n_samples=None)
        before, after = [], []
        for sp in grid:
            pruned = apply_masks(model, select_masks(scores, sp, scope))
            before.append(evaluate(pruned, test)["accuracy"])
            after.append(evaluate(repair_pruned(pruned, model, calib, "repair", n_samples=None, targets=targets),
                                  test)["accuracy"])
        accuracy[pruner] = {"before": np.array(before), "after": np.array(after)}
    return ConvNeXtResult(config=config, layers=layers, pruned_fraction=fraction, base=evaluate(model, test)["accuracy"],
                          sparsities=grid, accuracy=accuracy)


def convnext_table(r: ConvNeXtResult) -> list[dict[str, Any]]:
    """Per sparsity: accuracy of each ConvNeXt pruner, pruned → + REPAIR."""
    rows = []
    for i, sp in enumerate(r.sparsities):
        row: dict[str, Any] = {"sparsity (linear layers)": f"{sp:g}"}
        for p, acc in r.accuracy.items():
            row[f"{PRUNER_LABELS[p]} (pruned → + REPAIR)"] = f"{acc['before'][i]:.3f} → {acc['after'][i]:.3f}"
        rows.append(row)
    return rows


def plot_convnext(ax, r: ConvNeXtResult) -> None:
    """Appendix A.7 (left): ConvNeXt accuracy against the sparsity of its linear layers, each pruner without
    (dashed) and with (solid) REPAIR."""
    colors = {p: color(PRUNER_LABELS[p]) for p in r.accuracy}
    for p, acc in r.accuracy.items():
        ax.plot(r.sparsities, 100 * acc["before"], ls="--", marker="x", color=colors[p], label=f"{PRUNER_LABELS[p]}")
        ax.plot(r.sparsities, 100 * acc["after"], marker="o", color=colors[p], label=f"{PRUNER_LABELS[p]} + REPAIR")
    ax.axhline(100 * r.base, color="k", lw=0.8, ls=":", label="unpruned")
    _sparsity_axis(ax, r.sparsities)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("A.7: ConvNeXt, linear layers pruned")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


# ------------------------------------------------------------------------------------------ tables

def training_table(cfg: Config) -> list[dict[str, Any]]:
    """The two trained models: zoo key, epochs, final training loss, test accuracy as stored in the zoo."""
    _check(cfg)
    rows = []
    for norm in SETTINGS:
        c = edge_configs(cfg, norm=norm, seeds=[cfg.seed])[0]
        meta = info(c, cfg.cache_dir)
        rows.append({"model": f"{c.model}-{norm}", "seed": c.seed, "width": cfg.model_width, "key": c.key,
                     "epochs": c.epochs, "train loss": round(meta["metrics"]["train_loss"], 4),
                     "test accuracy (full split)": round(meta["metrics"]["test_accuracy"], 4)})
    return rows


def accuracy_values(res: PruningResult, norm: str) -> list[dict[str, Any]]:
    """The numbers of :func:`accuracy_table` (Fig. 5 C/D): per sparsity, each pruner's accuracy without and with the
    fix, and the unpruned model; what the chapter records (:func:`vfnb.results.record_table`) for ``vfnb sweep``."""
    fix = res.fix(norm).label
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(res.sparsities):
        row: dict[str, Any] = {"sparsity": f"{s:g}"}
        for p in res.pruners:
            c = res.accuracy[(norm, p)]
            row[PRUNER_LABELS[p]] = float(c["before"][i])
            row[f"{PRUNER_LABELS[p]} + {fix}"] = float(c["after"][i])
        rows.append(row)
    base = float(res.base[norm]["accuracy"])
    rows.append({"sparsity": "unpruned", **{k: base for k in rows[0] if k != "sparsity"}} if rows else
                {"sparsity": "unpruned"})
    return rows


def accuracy_table(res: PruningResult, norm: str) -> list[dict[str, Any]]:
    """Per sparsity: accuracy of every pruner without and with the fix (one model), as text ``before → after``: the
    numbers of :func:`accuracy_values`, formatted."""
    fix = res.fix(norm).label
    out = []
    for r in accuracy_values(res, norm):
        row: dict[str, Any] = {"sparsity": r["sparsity"]}
        for p in res.pruners:
            name = PRUNER_LABELS[p]
            row[f"{name} (pruned → +{fix})"] = (f"{r[name]:.3f}" if r["sparsity"] == "unpruned"
                                               else f"{r[name]:.3f} → {r[f'{name} + {fix}']:.3f}")
        out.append(row)
    return out


def calibration_table(res: PruningResult) -> list[dict[str, Any]]:
    """Appendix A.7: accuracy after the fix at ``cfg.sparsity`` against the number of calibration images."""
    rows = []
    for norm in res.settings:
        for p in res.pruners:
            c = res.calibration[(norm, p)]
            before = res.at(norm, p, _nearest(res.sparsities, res.cfg.sparsity))["before"]
            row = {"model": f"{res.label(norm)} + {res.fix(norm).label}", "pruner": PRUNER_LABELS[p],
                   "no fix": round(before, 4)}
            for n, a in zip(c["n"], c["accuracy"]):
                row[f"n={n}" + (" (all)" if n == c["n"][-1] else "")] = round(a, 4)
            rows.append(row)
    return rows


def timing_table(res: PruningResult) -> list[dict[str, Any]]:
    """Seconds spent pruning (scores and masks), normalizing, evaluating and diagnosing."""
    return [{"step": k, "seconds": round(v, 1)} for k, v in res.seconds.items()]


def warning_table(res: PruningResult) -> list[dict[str, Any]]:
    """The warnings raised during the run (mostly REPAIR meeting channels that pruning left constant)."""
    return [{"warning": k, "times": v} for k, v in res.warnings.most_common()] or [{"warning": "none", "times": 0}]


# ------------------------------------------------------------------------------------------ figures

def _sparsity_axis(ax, grid: list[float]) -> None:
    """An x axis uniform in −log(1 − s), so that 0.9, 0.95 and 0.99 do not crowd together."""
    ax.set_xscale("function", functions=(lambda s: -np.log1p(-np.clip(s, 0, 1 - 1e-9)),
                                         lambda u: -np.expm1(-u)))
    # labels where the axis has room for them (−log(1 − s) squeezes 0–0.5 into the first sixth)
    ticks = [g for g in grid if g >= 0.5 and g in (0.5, 0.8, 0.9, 0.95, 0.99)] or list(grid)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xticks([g for g in grid if g not in ticks], minor=True)
    ax.set_xlim(max(0.0, min(grid) - 0.05), 1 - (1 - max(grid)) * 0.7)


def plot_accuracy(ax, res: PruningResult, norm: str, pruners: list[str] | None = None,
                  mark: float | None = None) -> None:
    """Paper Fig. 5C/D: accuracy against sparsity, per pruner, without (dashed) and with (solid) the fix."""
    from ..plots import style
    fix = res.fix(norm).label
    with style():
        x = np.array(res.sparsities)
        for i, p in enumerate(pruners or res.pruners):
            c = res.accuracy[(norm, p)]
            col = color(PRUNER_LABELS[p], i)
            ax.plot(x, c["after"], "o-", color=col, label=f"{PRUNER_LABELS[p]} + {fix}")
            ax.plot(x, c["before"], "s--", color=col, alpha=0.6, label=f"{PRUNER_LABELS[p]}")
        ax.axhline(res.base[norm]["accuracy"], color="gray", lw=1, label="unpruned")
        ax.axhline(1 / len(np.asarray(res.base_logits[norm].mean)), color="gray", ls=":", lw=1, label="chance")
        if mark is not None:
            ax.axvline(mark, color="black", lw=0.8, alpha=0.5)
        _sparsity_axis(ax, res.sparsities)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("sparsity (axis: −log(1 − s))")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{res.label(norm)}: one-shot pruning, then {fix}")
        ax.legend(loc="lower left")


def plot_calibration(ax, res: PruningResult, norm: str) -> None:
    """Appendix A.7: accuracy after the fix against the number of calibration images (log axis)."""
    from ..plots import style
    with style():
        for i, p in enumerate(res.pruners):
            c = res.calibration[(norm, p)]
            ax.plot(c["n"], c["accuracy"], "o-", color=color(PRUNER_LABELS[p], i), label=PRUNER_LABELS[p])
        ax.set_xscale("log", base=2)
        sizes = sorted({n for p in res.pruners for n in res.calibration[(norm, p)]["n"]})
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.set_xlabel("calibration images (unpruned and pruned model)")
        ax.set_ylabel("test accuracy after the fix")
        ax.set_title(f"{res.label(norm)} at sparsity {res.cfg.sparsity:g} + {res.fix(norm).label}")
        ax.legend()


def logit_curves(res: PruningResult, norm: str, pruner: str, sparsity: float) -> dict[str, Any]:
    """Fig. 5A's logit statistics: unpruned, pruned, pruned + fix."""
    d = res.diagnosis[(norm, pruner, sparsity)]
    fix = res.fix(norm).label
    return {"unpruned": res.base_logits[norm], f"pruned {sparsity:g}": d.logits["pruned"],
            f"pruned + {fix}": d.logits["fixed"]}


def vf_curves(res: PruningResult, norm: str, pruner: str, sparsity: float) -> dict[str, Any]:
    """Fig. 5B's curves: the VF bound of the pruned model before and after the fix."""
    d = res.diagnosis[(norm, pruner, sparsity)]
    fix = res.fix(norm).label
    return {f"{res.label(norm)} pruned {sparsity:g}": d.vf["pruned"], f"+ {fix}": d.vf["fixed"]}


def explorer_figure(res: PruningResult, norm: str, pruner: str, sparsity: float):
    """One explorer frame: accuracy curve (with the sparsity marked), logits, VF bound, before/after."""
    from ..plots import figure, plot_logits, plot_vf_curves
    fig, ax = figure(3, width=4.3, height=3.4)
    plot_accuracy(ax[0], res, norm, [pruner], mark=sparsity)
    acc = res.at(norm, pruner, sparsity)
    ax[0].set_title(f"{PRUNER_LABELS[pruner]} at {sparsity:g}: accuracy {acc['before']:.3f} → {acc['after']:.3f}",
                    fontsize=9)
    plot_logits(ax[1], logit_curves(res, norm, pruner, sparsity))
    plot_vf_curves(ax[2], vf_curves(res, norm, pruner, sparsity))
    ax[2].set_ylabel("E‖g_pruned‖ / E‖g_unpruned‖  (bound ε_l)")
    fig.suptitle(f"{res.label(norm)} + {res.fix(norm).label}")
    return fig


# ------------------------------------------------------------------------------------------ claims

def _last(curve: Any) -> float:
    return float(np.asarray(curve.ratio)[-1])


def claims(res: PruningResult) -> list[dict[str, Any]]:
    """The paper's §5.5 / A.7 claims, each checked on this run: claim, whether it holds, the evidence.
    Accuracy comparisons hold only beyond the test-set noise (:mod:`vfnb.chapters.claims`)."""
    c = Claims(n=res.n_test or None)
    s = _nearest(res.sparsities, res.cfg.sparsity)
    p0 = "magnitude" if "magnitude" in res.pruners else res.pruners[0]
    # Fig. 5A/B: the feature vanishes after pruning, and the fix restores it
    ev, holds = [], []
    for norm in res.settings:
        d = res.diagnosis[(norm, p0, s)]
        before, after = _last(d.vf["pruned"]), _last(d.vf["fixed"])
        holds.append(before < 0.5 and after > before)
        ev.append(f"{res.label(norm)}: E_L = {before:.3f} pruned, {after:.3f} after {res.fix(norm).label}")
    c.add(f"At high sparsity ({PRUNER_LABELS[p0]} at {s:g}) the input-induced feature of the last layer "
          "vanishes (E_L well below 1), and post-pruning normalization brings it back", all(holds), "; ".join(ev))
    for norm in res.settings:
        bs = res.base_logits[norm]
        ps = res.diagnosis[(norm, p0, s)].logits["pruned"]
        std_ratio = float(np.mean(np.asarray(ps.std)) / max(np.mean(np.asarray(bs.std)), 1e-12))
        dist0 = float(np.mean(np.abs(np.asarray(ps.mean) - np.asarray(ps.zero))))
        spread = float(np.mean(np.abs(np.asarray(bs.mean) - np.asarray(bs.zero))))
        c.add(f"Fig. 5A: the logits of pruned {res.label(norm)} hardly vary with the input (their std shrinks) "
              "and sit near f(0)", std_ratio < 0.5,
              f"{PRUNER_LABELS[p0]} at {s:g}: mean per-class logit std {std_ratio:.3f}× the unpruned model's; "
              f"mean |E f(x) − f(0)| = {dist0:.3f} (unpruned: {spread:.3f})")
    # Fig. 5C/D: normalization helps, most at high sparsity
    for norm in res.settings:
        fix = res.fix(norm).label
        x = np.array(res.sparsities)
        pairs = [(float(a), float(b)) for p in res.pruners
                 for a, b in zip(res.accuracy[(norm, p)]["after"], res.accuracy[(norm, p)]["before"])]
        g = np.stack([res.accuracy[(norm, p)]["after"] - res.accuracy[(norm, p)]["before"] for p in res.pruners])
        hurts = sum(c.less(a, b) is True for a, b in pairs)
        helps = sum(c.greater(a, b) is True for a, b in pairs)
        c.add(f"{res.label(norm)}: {fix} after pruning does not hurt and helps (paper: 'consistently enhanced')",
              hurts == 0 and helps > 0,
              f"over {len(pairs)} (pruner, sparsity) points, {fix} is better beyond noise at {helps} and worse at "
              f"{hurts}; gain in accuracy: min {float(g.min()):+.3f}, max {float(g.max()):+.3f}")
        hi, lo = x >= 0.8, x <= 0.5
        if hi.any() and lo.any():
            ghi, glo = float(g[:, hi].mean()), float(g[:, lo].mean())
            c.add(f"{res.label(norm)}: {fix} helps most at high sparsity",
                  ghi > glo, f"mean gain at sparsity ≥ 0.8: {ghi:+.3f}; at ≤ 0.5: {glo:+.3f}")
    # the paper's headline number (VGG16-LN at 90 %: 72.6 % → 91.7 % on CIFAR-10)
    if 0.9 in res.sparsities and "magnitude" in res.pruners and "ln" in res.settings:
        a = res.at("ln", "magnitude", 0.9)
        more = "; ".join(f"at {x:g}: {res.at('ln', 'magnitude', x)['before']:.3f} → {res.at('ln', 'magnitude', x)['after']:.3f}"
                         for x in (0.8, 0.95) if x in res.sparsities)
        c.add(f"Post-pruning REPAIR rescues {res.label('ln')} at 90 % sparsity, to within 10 points of the unpruned "
              "model (paper, CIFAR-10 VGG16-LN: 72.6 % → 91.7 %)",
              all_of(c.greater(a["after"], a["before"]), bool(a["after"] > res.base["ln"]["accuracy"] - 0.1)),
              f"global magnitude at 0.9: {a['before']:.3f} → {a['after']:.3f} (unpruned {res.base['ln']['accuracy']:.3f})"
              + (f"; {more}" if more else ""), paper="72.6 % → 91.7 % (CIFAR-10 VGG16-LN, global magnitude, 90 %)")
    # A.7 / §5.5: repaired magnitude rivals the elaborate pruners
    others = [p for p in res.pruners if p in ("wanda", "fisher")]
    if "magnitude" in res.pruners and others:
        names = " / ".join(PRUNER_LABELS[p] for p in others)
        for norm in res.settings:
            fix = res.fix(norm).label
            hi = np.array(res.sparsities) >= 0.5
            mag = res.accuracy[(norm, "magnitude")]["after"][hi]
            raw = np.max([res.accuracy[(norm, p)]["before"][hi] for p in others], axis=0)
            fixed = np.max([res.accuracy[(norm, p)]["after"][hi] for p in others], axis=0)
            c.add(f"{res.label(norm)}: global magnitude + {fix} matches or beats the elaborate pruners ({names}) "
                  "without normalization (A.7: 'comparable results to advanced pruning methods')",
                  all(c.at_least(float(m), float(r)) for m, r in zip(mag, raw)),
                  f"at the {int(hi.sum())} sparsities ≥ 0.5, magnitude + {fix} minus the best of them: "
                  f"min {float(np.min(mag - raw)):+.3f}, mean {float(np.mean(mag - raw)):+.3f}")
            if "wanda" in others:
                wanda = res.accuracy[(norm, "wanda")]["after"][hi]
                wins = float(np.mean([c.at_least(float(m), float(w)) for m, w in zip(mag, wanda)]))
                c.add(f"{res.label(norm)}: after {fix}, magnitude pruning often surpasses Wanda (paper, ConvNeXt on "
                      "ImageNet)", wins >= 0.5,
                      f"magnitude + {fix} ≥ Wanda + {fix} (or within noise) at {wins:.0%} of the sparsities ≥ 0.5 "
                      f"(mean difference {float(np.mean(mag - wanda)):+.3f}); the best normalized pruner leads "
                      f"magnitude by up to {float(np.max(fixed - mag)):+.3f}")
    # A.7: Wanda on a ConvNeXt
    r = res.convnext
    if r is not None:
        hi = np.array(r.sparsities) >= 0.7
        if hi.any():
            w = r.accuracy["wanda"]
            gain = float(np.mean(w["after"][hi] - w["before"][hi]))
            verdicts = [c.greater(float(a), float(b)) for a, b in zip(w["after"][hi], w["before"][hi])]
            c.add("A.7 (ConvNeXt): REPAIR improves Wanda at high sparsity (paper, ConvNeXt-B on ImageNet: +36 points "
                  "at 80 %)", False if False in verdicts else True if True in verdicts else TIE,
                  f"mean gain at sparsity ≥ 0.7: {100 * gain:+.1f} points; "
                  + "; ".join(f"{sp:g}: {b:.3f} → {a:.3f}" for sp, b, a in
                              zip(np.array(r.sparsities)[hi], w["before"][hi], w["after"][hi])),
                  paper="+36 points at 80 % (ConvNeXt-B, ImageNet)")
            m = r.accuracy["magnitude-layerwise"]
            wins = float(np.mean([c.at_least(float(a), float(b)) for a, b in zip(m["after"][hi], w["after"][hi])]))
            c.add("A.7 (ConvNeXt): after REPAIR, magnitude pruning matches or beats Wanda", wins >= 0.5,
                  f"layerwise magnitude + REPAIR ≥ Wanda + REPAIR (or within noise) at {wins:.0%} of the sparsities ≥ 0.7",
                  paper="at 76 %: Wanda 43.2 → 65.0 %, magnitude 35.5 → 69.9 % (ConvNeXt-B, ImageNet)")
    # A.7: a few calibration images suffice
    for norm in res.settings:
        cal = res.calibration[(norm, p0)]
        if len(cal["n"]) >= 2:
            few, full = float(cal["accuracy"][0]), float(cal["accuracy"][-1])
            c.add(f"{res.label(norm)}: {cal['n'][0]} calibration images already give about the result of all "
                  f"{cal['n'][-1]} (appendix A.7)", c.at_least(few, full),
                  f"{PRUNER_LABELS[p0]} at {res.cfg.sparsity:g}: {few:.3f} with n={cal['n'][0]}, "
                  f"{full:.3f} with n={cal['n'][-1]} (±{c.margin(few, full):.3f})")
    return c.table()


# ------------------------------------------------------------------------------------------ prose with numbers

def note(res: PruningResult, what: str):
    """A short Markdown paragraph stating what a figure shows in this run, with its numbers.

    ``what``: ``"fig5a"``, ``"fig5b"``, ``"fig5cd"`` or ``"a7"``.
    """
    from IPython.display import Markdown

    s = _nearest(res.sparsities, res.cfg.sparsity)
    p0 = "magnitude" if "magnitude" in res.pruners else res.pruners[0]
    if what == "fig5a":
        if "bn" not in res.settings:
            return Markdown("(Figure 5A shows the BatchNorm model, which this run left out.)")
        base, d = res.base_logits["bn"], res.diagnosis[("bn", p0, s)].logits
        sd = {k: float(np.mean(np.asarray(v.std))) for k, v in
              (("unpruned", base), ("pruned", d["pruned"]), ("reset", d["fixed"]))}
        off = float(np.mean(np.abs(np.asarray(d["pruned"].mean) - np.asarray(d["pruned"].zero))))
        a = res.at("bn", p0, s)
        text = (f"Here ({PRUNER_LABELS[p0]} pruning of {res.label('bn')} at sparsity {s:g}): the per-class logit std "
                f"over the test images is on average {sd['unpruned']:.3g} for the unpruned model, "
                f"{sd['pruned']:.3g} after pruning and {sd['reset']:.3g} after RESET. The mean logits of the pruned "
                f"model lie on average {off:.3g} from f(0). Accuracy: {a['before']:.3f} pruned, "
                f"{a['after']:.3f} after RESET (unpruned {res.base['bn']['accuracy']:.3f}).")
    elif what == "fig5b":
        parts = []
        for norm in res.settings:
            d = res.diagnosis[(norm, p0, s)].vf
            parts.append(f"{res.label(norm)}: the bound at the last layer is {float(d['pruned'].bound[-1]):.3g} "
                         f"after pruning and {float(d['fixed'].bound[-1]):.3g} after {res.fix(norm).label} "
                         f"(E_L = {_last(d['pruned']):.3g} → {_last(d['fixed']):.3g})")
        text = f"Here ({PRUNER_LABELS[p0]}, sparsity {s:g}): " + "; ".join(parts) + "."
    elif what == "fig5cd":
        parts = []
        for norm in res.settings:
            fix = res.fix(norm).label
            best = max(((p, i) for p in res.pruners for i in range(len(res.sparsities))),
                       key=lambda pi: res.accuracy[(norm, pi[0])]["after"][pi[1]]
                       - res.accuracy[(norm, pi[0])]["before"][pi[1]])
            p, i = best
            c = res.accuracy[(norm, p)]
            parts.append(f"for {res.label(norm)} the largest gain from {fix} is {PRUNER_LABELS[p]} at sparsity "
                         f"{res.sparsities[i]:g}, {c['before'][i]:.3f} → {c['after'][i]:.3f}")
        text = "In this run, " + "; ".join(parts) + ". The claims table at the end compares low and high sparsity."
    elif what == "a7":
        parts = []
        for norm in res.settings:
            c = res.calibration[(norm, p0)]
            accs = ", ".join(f"{a:.3f} (n={n})" for n, a in zip(c["n"], c["accuracy"]))
            parts.append(f"{res.label(norm)} + {res.fix(norm).label}: {accs}")
        text = f"{PRUNER_LABELS[p0]} at sparsity {res.cfg.sparsity:g}: " + "; ".join(parts) + "."
    else:
        raise ValueError(f"unknown note {what!r}; choose one of fig5a, fig5b, fig5cd, a7")
    return Markdown(text)
