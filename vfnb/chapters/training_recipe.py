"""Paper §A.4: the training recipe decides whether merging works: the barrier after weight matching against
the learning rate and the weight decay (Figures 6 and 7), Kaiming-normal against Kaiming-uniform
initialization with the distance between the edge models along training (Figure 9), REPAIR against RESCALE
at weak and strong weight decay, and VGG16-LN on MNIST (Git Re-Basin's failure at learning rate 0.001)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..activations import example_input
from ..config import Config
from ..plots import CYCLE, color
from ..data import VisionData
from ..evaluate import barrier, evaluate, interpolation_curve
from ..graph import apply_permutation
from ..matching import weight_matching
from ..merge import interpolate
from ..normalize import repair, rescale
from ..train import TrainConfig, recipe, state_distance
from ..zoo import get_or_train, resolve_device, snapshots
from .claims import TIE, Claims, all_of
from .common import check_config, match_data, seed_pairs, test_data

#: Architectures of the learning-rate sweep: label -> (model, norm); "VGG" and "VGG-LN" take ``cfg.model``.
ARCHS = {"VGG": (None, "none"), "VGG-LN": (None, "ln"), "ResNet20-LN": ("resnet20", "ln")}
#: The two initializations of Figure 9 (``vfnb.models.init``), as the paper names them.
INITS = {"kaiming_normal": "Kaiming (normal)", "uniform": "Kaiming uniform"}
#: Git Re-Basin's MNIST recipe (Ainsworth et al., quoted in the paper's A.3): VGG16-LN, Kaiming-uniform
#: initialization, SGD with momentum 0.9, linear warm-up over the first epoch then a cosine, batch 100, weight
#: decay 5e-4; plus the book's gradient clip at 1.0, without which lr 0.1 diverged to chance at 1/8 width
#: (measured at cpu: both seeds at 10 % test accuracy after 10 epochs).
REBASIN = {"model": "vgg16", "norm": "ln", "init": "uniform", "schedule": "warmup_cosine", "batch_size": 100,
           "weight_decay": 5e-4, "grad_clip": 1.0}
#: Architectures in the first colours of the cycle; methods in the book's method colours (:func:`vfnb.plots.color`).
COLORS = {"VGG": CYCLE[10], "VGG-LN": CYCLE[4], "ResNet20-LN": CYCLE[5],
          **{m: color(m) for m in ("direct", "weight matching", "REPAIR", "RESCALE")}}


@dataclass
class Pair:
    """Two edge models trained with one recipe, merged directly and after weight matching."""

    arch: str
    setting: dict[str, Any]
    configs: list[TrainConfig]
    edge_accuracy: list[float]
    curves: dict[str, dict[str, np.ndarray]]  # "direct" / "weight matching" -> α curve
    moved: list[float]  # ‖θ_T − θ_0‖ / ‖θ_0‖ per edge model
    distance: np.ndarray | None = None  # ‖θ_a − θ_b‖ per epoch (0 = initialization)
    fixes: dict[str, float] = field(default_factory=dict)  # accuracy at α = 0.5 after WM + REPAIR / RESCALE

    def barrier(self, method: str) -> float:
        c = self.curves[method]
        return barrier(c["alpha"], c["accuracy"])

    def midpoint(self, method: str) -> float:
        c = self.curves[method]
        return float(c["accuracy"][int(np.argmin(np.abs(c["alpha"] - 0.5)))])

    def row(self) -> dict[str, Any]:
        return {"architecture": self.arch, **self.setting, "seeds": f"{self.configs[0].seed}, {self.configs[1].seed}",
                "edge accuracy": float(np.mean(self.edge_accuracy)),
                "weights moved": float(np.mean(self.moved)),
                "barrier, direct": self.barrier("direct"), "barrier, WM": self.barrier("weight matching"),
                "WM at α=0.5": self.midpoint("weight matching")}


@dataclass
class RecipeResult:
    """Everything the A.4 chapter shows."""

    cfg: Config
    lr_pairs: list[Pair]
    wd_pairs: list[Pair]
    init_pairs: list[Pair]
    norm_pairs: list[Pair]
    rebasin_pairs: list[Pair]
    n_test: int
    seconds: dict[str, float] = field(default_factory=dict)


def pair_configs(cfg: Config, arch: str, seeds: tuple[int, int], **overrides: Any) -> list[TrainConfig]:
    """The two edge models of ``arch`` (one of :data:`ARCHS`) with the chapter's recipe, ``overrides`` replacing
    any field (``lr``, ``weight_decay``, ``init``, ...). Every model keeps its per-epoch weights
    (``snapshots=True``) for the distances of Figure 9."""
    model, norm = ARCHS[arch] if arch in ARCHS else (arch, overrides.pop("norm"))
    model = model or cfg.model
    if overrides.get("init") == build_defaults(model).get("init"):
        del overrides["init"]  # the architecture's own default: the models of the other sweeps serve
    width = cfg.model_width * (4.0 if model == "resnet20" else 1.0)
    base = {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "n_train": cfg.n_train, "width": width, "norm": norm, "snapshots": True, **overrides}
    if model == "resnet20" and norm == "ln":  # its own warm-up at the small profiles (vfnb.train.recipe)
        base.setdefault("schedule", "warmup_step")
    return [recipe(model, cfg.profile, dataset=cfg.dataset, seed=s, **base) for s in seeds]


def build_defaults(model: str) -> dict[str, Any]:
    """The keyword defaults of ``build_model(model)`` (e.g. its ``init``)."""
    import inspect

    from ..models import VGG, ResNet20
    cls = ResNet20 if model == "resnet20" else VGG
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _moved(init: dict, model: nn.Module) -> float:
    """‖θ_T − θ_0‖ / ‖θ_0‖ of a trained model against its initial weights."""
    zero = {k: v * 0 for k, v in init.items()}
    return state_distance(model.state_dict(), init) / state_distance(init, zero)


def measure_pair(cfg: Config, arch: str, seeds: tuple[int, int], test: VisionData, mdata: VisionData,
                 setting: dict[str, Any], fixes: bool = False, progress: bool = True, **overrides: Any) -> Pair:
    """Train (or load) one pair, then its α curves directly and after weight matching; with ``fixes``, also
    WM + REPAIR and WM + RESCALE at α = 0.5."""
    device = resolve_device(cfg.device)
    configs = pair_configs(cfg, arch, seeds, **overrides)
    models = [get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
              .eval() for c in configs]
    a, b = models
    partner = apply_permutation(b, weight_matching(a, b, example_input(mdata, model=a), seed=0))
    alphas = cfg.alphas
    curves = {"direct": interpolation_curve(a, b, test, alphas, progress=False),
              "weight matching": interpolation_curve(a, partner, test, alphas, progress=False)}
    snaps = [snapshots(c, cfg.cache_dir) for c in configs]
    distance = np.array([state_distance(x, y) for x, y in zip(*snaps)])
    pair = Pair(arch=arch, setting=setting, configs=configs,
                edge_accuracy=[float(curves["direct"]["accuracy"][0]), float(curves["direct"]["accuracy"][-1])],
                curves=curves, moved=[_moved(sn[0], m) for sn, m in zip(snaps, models)],
                distance=distance)
    if fixes:
        merged = interpolate(a, partner, 0.5)
        pair.fixes = {"WM": pair.midpoint("weight matching"),
                      "WM + REPAIR": evaluate(repair(merged, [a, partner], [0.5, 0.5], mdata), test)["accuracy"],
                      "WM + RESCALE": evaluate(rescale(merged, [a, partner], [0.5, 0.5], mdata), test)["accuracy"]}
    return pair


def run(cfg: Config, progress: bool = True) -> RecipeResult:
    """Every experiment of the chapter. Pairs that share a recipe are trained once (the zoo)."""
    check_config(cfg, "training_recipe")
    test, mdata = test_data(cfg), match_data(cfg)
    first = seed_pairs(cfg.seeds)[0]
    seconds: dict[str, float] = {}
    jobs: list[tuple[str, str, tuple[int, int], dict[str, Any], bool, dict[str, Any]]] = []
    for arch in cfg.lr_archs:
        jobs += [("lr", arch, first, {"lr": lr}, False, {"lr": lr}) for lr in cfg.lrs]
    jobs += [("wd", "VGG", first, {"weight decay": wd}, False, {"weight_decay": wd}) for wd in cfg.weight_decays]
    for init in INITS:
        jobs += [("init", "VGG-LN", first, {"init": INITS[init], "lr": lr}, False, {"init": init, "lr": lr})
                 for lr in (min(cfg.lrs), max(cfg.lrs))]
    for wd in (min(cfg.weight_decays), max(cfg.weight_decays)):
        jobs += [("norm", "VGG", p, {"weight decay": wd}, True, {"weight_decay": wd}) for p in seed_pairs(cfg.seeds)]
    jobs += [("rebasin", "vgg16", first, {"lr": lr}, False,
              {**{k: v for k, v in REBASIN.items() if k != "model"}, "lr": lr, "epochs": cfg.rebasin_epochs})
             for lr in cfg.rebasin_lrs]
    out: dict[str, list[Pair]] = {k: [] for k in ("lr", "wd", "init", "norm", "rebasin")}
    rebasin_data: tuple[VisionData, VisionData] | None = None
    measured: dict[tuple[str, ...], Pair] = {}  # pairs that several sweeps share are measured once
    jobs.sort(key=lambda job: not job[4])  # those that need the fixes first, so the others can reuse them
    for kind, arch, seeds, setting, fixes, overrides in tqdm(jobs, desc="A.4 edge pairs", disable=not progress):
        t = time.perf_counter()
        if kind == "rebasin":
            overrides = {**overrides, "norm": REBASIN["norm"]}
            cfg_ = cfg.replace(model_width=cfg.rebasin_width, dataset=cfg.rebasin_dataset)
            if rebasin_data is None:
                rebasin_data = (test_data(cfg_), match_data(cfg_))
            pair = measure_pair(cfg_, REBASIN["model"], seeds, *rebasin_data, setting, progress=progress, **overrides)
            pair.arch = "VGG16-LN"
        else:
            key = tuple(c.key for c in pair_configs(cfg, arch, seeds, **overrides))
            known = measured.get(key)
            if known is not None and (known.fixes or not fixes):
                pair = dataclasses.replace(known, setting=setting)
            else:
                pair = measure_pair(cfg, arch, seeds, test, mdata, setting, fixes=fixes, progress=progress, **overrides)
                measured[key] = pair
        out[kind].append(pair)
        seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - t
    return RecipeResult(cfg=cfg, lr_pairs=out["lr"], wd_pairs=out["wd"], init_pairs=out["init"],
                        norm_pairs=out["norm"], rebasin_pairs=out["rebasin"], n_test=len(test), seconds=seconds)


# --- tables -------------------------------------------------------------------------------------------------
def sweep_table(pairs: list[Pair]) -> list[dict[str, Any]]:
    """One row per pair: its setting, edge accuracy, how far training moved the weights, both barriers."""
    return [p.row() for p in pairs]


def normalization_table(res: RecipeResult) -> list[dict[str, Any]]:
    """WM, WM + REPAIR and WM + RESCALE at α = 0.5, mean ± std over the seed pairs, per weight decay."""
    rows = []
    for wd in dict.fromkeys(p.setting["weight decay"] for p in res.norm_pairs):
        pairs = [p for p in res.norm_pairs if p.setting["weight decay"] == wd]
        row: dict[str, Any] = {"weight decay": wd, "pairs": len(pairs),
                               "edges": _pm([np.mean(p.edge_accuracy) for p in pairs])}
        for k in ("WM", "WM + REPAIR", "WM + RESCALE"):
            row[k] = _pm([p.fixes[k] for p in pairs])
        rows.append(row)
    return rows


def _pm(values: list[float]) -> str:
    v = np.asarray(values, float)
    return f"{100 * v.mean():.1f} ± {100 * v.std():.1f} %" if len(v) > 1 else f"{100 * v[0]:.1f} %"


# --- figures ------------------------------------------------------------------------------------------------
def plot_barriers(axes, res: RecipeResult) -> None:
    """Figure 6: the barrier against the learning rate (left) and the weight decay (right), after weight
    matching (solid) and without alignment (dashed)."""
    for ax, pairs, key, label in ((axes[0], res.lr_pairs, "lr", "learning rate"),
                                  (axes[1], res.wd_pairs, "weight decay", "weight decay")):
        for arch in dict.fromkeys(p.arch for p in pairs):
            own = [p for p in pairs if p.arch == arch]
            x = [p.setting[key] for p in own]
            ax.plot(x, [100 * p.barrier("weight matching") for p in own], marker="o", color=COLORS[arch],
                    label=f"{arch}, weight matching")
            ax.plot(x, [100 * p.barrier("direct") for p in own], marker="x", ls="--", color=COLORS[arch],
                    label=f"{arch}, direct")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("barrier (accuracy points)")
        ax.set_ylim(bottom=0)
    axes[0].set_title(f"Fig. 6A: by learning rate (wd {res.cfg.weight_decay:g})")
    axes[1].set_title(f"Fig. 6C: by weight decay (lr {res.cfg.lr:g})")
    for ax in axes[:2]:
        ax.set_ylim(0, 100)
        ax.legend(loc="lower left")


def plot_curves(axes, res: RecipeResult) -> None:
    """Figure 7 (A, C): test accuracy along α after weight matching, one line per learning rate (left, the first
    architecture) and per weight decay (right)."""
    cmap = ["#fdae61", "#f46d43", "#d73027", "#a50026", "#67001f"]
    arch = res.lr_pairs[0].arch
    for ax, pairs, key in ((axes[0], [p for p in res.lr_pairs if p.arch == arch], "lr"),
                           (axes[1], res.wd_pairs, "weight decay")):
        for i, p in enumerate(pairs):
            c = p.curves["weight matching"]
            ax.plot(c["alpha"], 100 * c["accuracy"], marker="o", color=cmap[i % len(cmap)], label=f"{key} {p.setting[key]:g}")
        ax.set_xlabel("α")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(loc="lower center")
    axes[0].set_title(f"Fig. 7A: {arch} after WM, by learning rate")
    axes[1].set_title("Fig. 7C: VGG after WM, by weight decay")


def plot_init(axes, res: RecipeResult) -> None:
    """Figure 9: barrier after weight matching for each initialization and learning rate (left), and the ℓ2
    distance between the two edge models along training (right)."""
    lrs = sorted(dict.fromkeys(p.setting["lr"] for p in res.init_pairs))
    width = 0.38
    for i, init in enumerate(INITS.values()):
        own = {p.setting["lr"]: p for p in res.init_pairs if p.setting["init"] == init}
        color = ["#c0392b", "#2980b9"][i]
        axes[0].bar(np.arange(len(lrs)) + (i - 0.5) * width, [100 * own[lr].barrier("weight matching") for lr in lrs],
                    width, color=color, label=init)
        for lr, ls in zip(lrs, ("-", "--")):
            d = own[lr].distance
            axes[1].plot(np.arange(len(d)), d, color=color, ls=ls, label=f"{init}, lr {lr:g}")
    axes[0].set_xticks(np.arange(len(lrs)), [f"lr {lr:g}" for lr in lrs])
    axes[0].set_ylabel("barrier after WM (points)")
    axes[0].set_ylim(0, 100)
    axes[0].set_title("Fig. 9A: barrier after WM")
    axes[0].legend(loc="upper right")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("‖θ₀ − θ₁‖ (ℓ2, all weights)")
    axes[1].set_title("Fig. 9B: distance in training")
    axes[1].legend(loc="center right")


def plot_normalization(ax, res: RecipeResult) -> None:
    """WM, WM + REPAIR and WM + RESCALE at α = 0.5 per weight decay: every seed pair as a dot, the mean as a bar."""
    wds = list(dict.fromkeys(p.setting["weight decay"] for p in res.norm_pairs))
    methods = (("WM", COLORS["weight matching"]), ("WM + REPAIR", COLORS["REPAIR"]), ("WM + RESCALE", COLORS["RESCALE"]))
    width = 0.26
    for j, (m, col) in enumerate(methods):
        for i, wd in enumerate(wds):
            vals = [100 * p.fixes[m] for p in res.norm_pairs if p.setting["weight decay"] == wd]
            x = i + (j - 1) * width
            ax.bar(x, np.mean(vals), width, color=col, alpha=0.5, label=m if i == 0 else None)
            ax.plot([x] * len(vals), vals, "o", color=col, ms=4)
    edges = [100 * np.mean([np.mean(p.edge_accuracy) for p in res.norm_pairs if p.setting["weight decay"] == wd])
             for wd in wds]
    for i, e in enumerate(edges):
        ax.hlines(e, i - 1.5 * width, i + 1.5 * width, color="k", lw=1, ls=":", label="edges" if i == 0 else None)
    ax.set_xticks(range(len(wds)), [f"weight decay {wd:g}" for wd in wds])
    ax.set_ylabel("test accuracy at α = 0.5 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("REPAIR and RESCALE after weight matching (VGG)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_rebasin(ax, res: RecipeResult) -> None:
    """VGG16-LN on MNIST with Git Re-Basin's recipe: test accuracy along α after weight matching, per learning
    rate (dashed: direct merging)."""
    colors = ["#fdae61", "#f46d43", "#a50026", "#67001f"]
    for i, p in enumerate(res.rebasin_pairs):
        for method, ls in (("weight matching", "-"), ("direct", "--")):
            c = p.curves[method]
            ax.plot(c["alpha"], 100 * c["accuracy"], ls=ls, marker="o" if ls == "-" else None,
                    color=colors[i % len(colors)], label=f"lr {p.setting['lr']:g}, {method}")
    ax.set_xlabel("α")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("VGG16-LN on MNIST, Git Re-Basin's recipe")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


# --- claims -------------------------------------------------------------------------------------------------
def claims(res: RecipeResult) -> list[dict[str, str]]:
    """The appendix's statements, each checked on this run (accuracy comparisons beyond the test noise)."""
    c = Claims(n=res.n_test)

    def ends(pairs: list[Pair], key: str) -> tuple[Pair, Pair]:
        ordered = sorted(pairs, key=lambda p: p.setting[key])
        return ordered[0], ordered[-1]

    verdicts, evidence = [], []
    for arch in dict.fromkeys(p.arch for p in res.lr_pairs):
        lo, hi = ends([p for p in res.lr_pairs if p.arch == arch], "lr")
        b_lo, b_hi = lo.barrier("weight matching"), hi.barrier("weight matching")
        verdicts.append(c.greater(1 - b_hi, 1 - b_lo))
        evidence.append(f"{arch}: {100 * b_lo:.1f} → {100 * b_hi:.1f} points (lr {lo.setting['lr']:g} → {hi.setting['lr']:g})")
    c.add("A larger learning rate lowers the barrier after weight matching (Fig. 6A)", all_of(*verdicts),
          "; ".join(evidence), paper="lr 0.01 → 0.1: barrier down by over 40 % (VGG16-LN, ResNet20, CIFAR-10)")
    lo, hi = ends(res.wd_pairs, "weight decay")
    b_lo, b_hi = lo.barrier("weight matching"), hi.barrier("weight matching")
    c.add("Stronger weight decay lowers the barrier after weight matching (Fig. 6C)", c.greater(1 - b_hi, 1 - b_lo),
          f"VGG: {100 * b_lo:.1f} → {100 * b_hi:.1f} points (weight decay {lo.setting['weight decay']:g} → "
          f"{hi.setting['weight decay']:g})", paper="1e-4 → 5e-4: post-WM barrier down by over 60 % (VGG16, CIFAR-10)")
    d_lo, d_hi = lo.barrier("direct"), hi.barrier("direct")
    c.add("Weight decay matters less for direct merging than after weight matching (Fig. 6D)",
          bool(abs(d_hi - d_lo) < abs(b_hi - b_lo)),
          f"direct barrier changes by {100 * abs(d_hi - d_lo):.1f} points, WM barrier by {100 * abs(b_hi - b_lo):.1f}")
    accs = [float(np.mean(p.edge_accuracy)) for p in res.lr_pairs + res.wd_pairs]
    c.add("The edge models' accuracy is similar across the sweep (the effect is not better edges)",
          c.greater(max(accs), min(accs)) == TIE,
          f"edge accuracy from {100 * min(accs):.1f} to {100 * max(accs):.1f} % (similar: within the test noise)")
    small = min(p.setting["lr"] for p in res.init_pairs)
    kn = next(p for p in res.init_pairs if p.setting["lr"] == small and p.setting["init"] == INITS["kaiming_normal"])
    un = next(p for p in res.init_pairs if p.setting["lr"] == small and p.setting["init"] == INITS["uniform"])
    c.add(f"At a small learning rate ({small:g}), Kaiming-uniform models merge better than Kaiming-normal ones (Fig. 9A)",
          c.greater(1 - un.barrier("weight matching"), 1 - kn.barrier("weight matching")),
          f"barrier after WM: uniform {100 * un.barrier('weight matching'):.1f}, normal "
          f"{100 * kn.barrier('weight matching'):.1f} points")
    c.add("Kaiming-normal edge models end training farther apart than Kaiming-uniform ones (Fig. 9B)",
          bool(kn.distance[-1] > un.distance[-1]),
          f"distance after training {kn.distance[-1]:.1f} vs {un.distance[-1]:.1f} (at initialization "
          f"{kn.distance[0]:.1f} vs {un.distance[0]:.1f}, which the variances fix; lr {small:g})")
    rows = normalization_table(res)
    weak = [p for p in res.norm_pairs if p.setting["weight decay"] == min(p.setting["weight decay"] for p in res.norm_pairs)]
    strong = [p for p in res.norm_pairs if p.setting["weight decay"] == max(p.setting["weight decay"] for p in res.norm_pairs)]
    rep_w, res_w = np.mean([p.fixes["WM + REPAIR"] for p in weak]), np.mean([p.fixes["WM + RESCALE"] for p in weak])
    c.add("With weak weight decay, RESCALE beats REPAIR (A.4, weight decay and post-merging normalization)",
          c.greater(res_w, rep_w, n=res.n_test * len(weak)),
          f"mean over {len(weak)} pairs: RESCALE {100 * res_w:.1f} %, REPAIR {100 * rep_w:.1f} % "
          f"(weight decay {weak[0].setting['weight decay']:g})")
    std_w = np.std([p.fixes["WM + REPAIR"] for p in weak])
    std_s = np.std([p.fixes["WM + REPAIR"] for p in strong])
    c.add("REPAIR is less stable across seed pairs with weak weight decay than with strong",
          bool(std_w > std_s) if len(weak) > 1 else TIE,
          f"std of WM + REPAIR over {len(weak)} pairs: {100 * std_w:.1f} (weak) vs {100 * std_s:.1f} (strong) points; "
          f"table: {rows[0]['WM + REPAIR']} vs {rows[-1]['WM + REPAIR']}" if len(weak) > 1 else
          "one seed pair: a spread needs at least two (pass more seeds)")
    lo, hi = ends(res.rebasin_pairs, "lr")
    c.add(f"VGG16-LN on MNIST: weight matching merges better at a larger learning rate ({lo.setting['lr']:g} → "
          f"{hi.setting['lr']:g}; the paper: Git Re-Basin's failure at 0.001 is its learning rate)",
          c.greater(hi.midpoint("weight matching"), lo.midpoint("weight matching")),
          f"WM at α = 0.5: {100 * lo.midpoint('weight matching'):.1f} % → {100 * hi.midpoint('weight matching'):.1f} % "
          f"(edges {100 * np.mean(lo.edge_accuracy):.1f} % → {100 * np.mean(hi.edge_accuracy):.1f} %); barrier after WM "
          f"{100 * lo.barrier('weight matching'):.1f} → {100 * hi.barrier('weight matching'):.1f} points")
    return c.rows
