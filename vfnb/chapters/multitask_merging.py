"""Paper §6 and beyond: multi-task merging of experts from one foundation (local) and from different foundations
(non-local), variance collapse and TACT (related work: Sharma, Roy & Dziugaite, "The Non-Local Model Merging
Problem", Figs. 1-5), read through the vanishing feature (Def. 5.1). The chapter holds grids, tables and figures;
every method is a library function (``vfnb.multimerge``, ``vfnb.multitask``, ``vfnb.tact``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import inputs
from ..config import Config
from ..data import VisionData, calibration_subset, load_dataset
from ..diagnose import VFCurve, activation_gap, vf_curve
from ..evaluate import evaluate
from ..merge import average
from ..multimerge import ManyAlignment, align_many
from ..multitask import MultiTask, features, linear_probe, tall_merging, task_arithmetic, ties_merging
from ..normalize import layer_stats, repair, weighted_stats
from ..plots import color
from ..tact import tact
from ..train import TrainConfig, recipe, state_distance
from ..zoo import get_or_train, resolve_device
from . import claims as claims_mod
from .claims import Claims
from .common import check_config

#: Short labels of the tasks (vfnb.data.TASKS).
TASK_LABELS = {"mnist5k-0to4": "digits 0-4", "mnist5k-5to9": "digits 5-9", "mnist5k-inverted": "inverted",
               "mnist5k-rot90": "rotated 90°", "digits": "sklearn 8×8"}
#: The settings of Fig. 5 (and of the explorer), with their colours. "local" merges experts fine-tuned from one
#: foundation; every other one merges non-local experts (one foundation each).
VARIANTS = ("local", "non-local", "modulo permutation", "+ REPAIR", "+ TACT", "+ linear probe")
COLORS = {"local": "#2c3e50", "non-local": "#7f8c8d", "modulo permutation": color("weight matching"),
          "+ REPAIR": color("REPAIR"), "+ TACT": color("TACT"), "+ linear probe": "#8e44ad"}
METHODS = ("Task Arithmetic", "TIES")
#: One colour per task in the per-task figures (distinct from the settings' colours).
TASK_COLORS = ("#1f77b4", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
#: The landscapes of Figs. 1-2: setting -> what it merges.
LANDSCAPES = ("local", "non-local", "modulo permutation", "modulo permutation + TACT")
#: The experts' weight decay and schedule while fine-tuning (the learning rate and epochs are parameters).
FINETUNE = {"weight_decay": 5e-4, "schedule": "constant"}
#: The landscapes evaluate n_grid² merges per setting, so they read at most this many of each task's test images
#: (a fixed stratified subset); every other number uses all of them.
LANDSCAPE_IMAGES = 500
#: TALL's λ candidates (one for all tasks, chosen on training images; Wang et al. search a similar range).
TALL_LAMBDAS = (0.2, 0.4, 0.6)
#: MergeMany's rounds at most (each round matches every foundation to the average of the others).
MERGE_MANY_ROUNDS = 5
#: "Most of the gap": TACT closes at least this fraction of the gap between the permuted non-local merge and the
#: local one; "works": a merge keeps at least this much of the experts' accuracy on average.
MOST = 0.5


def foundation_configs(cfg: Config) -> list[TrainConfig]:
    """One foundation per seed: the chapter's CNN recipe on ``cfg.dataset`` with per-epoch snapshots (appendix
    A.4's configuration, so the zoo serves both chapters)."""
    return [recipe(cfg.model, cfg.profile, dataset=cfg.dataset, seed=s, epochs=cfg.epochs, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, n_train=cfg.n_train,
                   width=cfg.model_width, norm="none", snapshots=True) for s in cfg.seeds]


def expert_config(cfg: Config, task: str, foundation: TrainConfig) -> TrainConfig:
    """The expert of ``task`` fine-tuned from ``foundation`` (SGD at ``finetune_lr``, constant, weight decay 5e-4)."""
    return foundation.replace(dataset=task, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, snapshots=False,
                              init_from=foundation, **FINETUNE)


@dataclass
class Pick:
    """One merge chosen over the λ grid: its λ, and per task its test accuracy and normalized accuracy."""
    scale: float
    accuracy: list[float]
    normalized: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.normalized))

    @property
    def worst(self) -> float:
        return float(np.min(self.normalized))


@dataclass
class MultiTaskResult:
    cfg: Config
    tasks: list[str]
    expert_accuracy: dict[str, list[float]]            # "local"/"non-local" -> per task (test)
    foundation_accuracy: list[float]                   # each foundation on cfg.dataset's test split
    moved: list[dict[str, Any]]                        # how far every expert moved from its foundation
    grid: np.ndarray                                   # landscape axis values
    landscape: dict[str, dict[str, np.ndarray]]        # setting -> {"mean", "worst"} [λ1, λ2]
    picks: dict[str, dict[str, dict[int, Pick]]]       # method -> variant -> n tasks -> Pick
    gap: dict[str, list[list[dict[str, Any]]]]         # "merged"/"TACT" -> per task -> activation_gap rows
    gap_tasks: int
    tsne: dict[str, np.ndarray]                        # model -> [n, 2]
    tsne_labels: np.ndarray
    embedding_distance: dict[str, float]               # model -> E‖z − z_expert‖ / E‖z_expert‖
    vf: dict[str, list[VFCurve]]                       # "merged"/"TACT" -> per task
    alignments: list[dict[str, Any]]                   # reference vs MergeMany
    tall: list[dict[str, Any]]                         # TALL masks on all tasks, per setting
    n_test: int
    foundations: list[nn.Module]                       # one per seed
    local: list[nn.Module]                             # experts fine-tuned from foundations[0]
    nonlocal_experts: list[nn.Module]                  # expert t fine-tuned from foundations[t]
    alignment: ManyAlignment                           # the foundations aligned to foundation 0
    aligned: list[nn.Module]                           # the non-local experts moved by their foundation's permutation
    calib: list[VisionData]                            # training images per task (TACT, REPAIR, probes, λ)
    test: list[VisionData]                             # test images per task
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [TASK_LABELS[t] for t in self.tasks]


def _accuracies(model: MultiTask, data: list[VisionData]) -> list[float]:
    return [evaluate(model.for_task(t), d)["accuracy"] for t, d in enumerate(data)]


def accuracies(model: MultiTask, data: list[VisionData]) -> dict[str, float]:
    """Test accuracy of a multi-task network on each task (``data[t]`` is task t's), labelled by task name, rounded
    to 3 decimals."""
    names = [TASK_LABELS.get(getattr(d, "name", ""), f"task {t}") for t, d in enumerate(data)]
    return {n: round(a, 3) for n, a in zip(names, _accuracies(model, data))}


def _merge(method: str, base: nn.Module, experts: list[nn.Module], scale: float | list[float],
           density: float) -> MultiTask:
    if method == "Task Arithmetic":
        return task_arithmetic(base, experts, scale)
    return ties_merging(base, experts, density, float(scale))


def run(cfg: Config, progress: bool = True) -> MultiTaskResult:
    """Train (or load) the foundations and experts, then every merge of Figs. 1-5 and the diagnostics."""
    check_config(cfg, "multitask_merging")
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    device = resolve_device(cfg.device)
    tasks = list(cfg.tasks)
    n_tasks = len(tasks)

    def tick(part: str, since: float) -> float:
        now = time.perf_counter()
        seconds[part] = now - since
        return now

    t0 = time.perf_counter()
    fcfgs = foundation_configs(cfg)
    founds = [get_or_train(c, cfg.cache_path, cfg.data_root, device, progress) for c in fcfgs]
    lcfgs = [expert_config(cfg, t, fcfgs[0]) for t in tasks]
    ncfgs = [expert_config(cfg, t, fcfgs[i]) for i, t in enumerate(tasks)]
    local = [get_or_train(c, cfg.cache_path, cfg.data_root, device, progress) for c in lcfgs]
    nonlocal_ = [get_or_train(c, cfg.cache_path, cfg.data_root, device, progress) for c in ncfgs]
    for m in (*founds, *local, *nonlocal_):
        m.to("cpu").eval()
    t0 = tick("train or load", t0)

    train = [load_dataset(t, "train") for t in tasks]
    calib = [calibration_subset(d, min(cfg.task_calib, len(d)), seed=1) for d in train]
    test = []
    for t in tasks:
        d = load_dataset(t, "test")
        test.append(d if cfg.n_test is None or cfg.n_test >= len(d) else calibration_subset(d, cfg.n_test, seed=0))
    ftest = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    expert_acc = {"local": [evaluate(m, d)["accuracy"] for m, d in zip(local, test)],
                  "non-local": [evaluate(m, d)["accuracy"] for m, d in zip(nonlocal_, test)]}
    expert_calib = {"local": [evaluate(m, d)["accuracy"] for m, d in zip(local, calib)],
                    "non-local": [evaluate(m, d)["accuracy"] for m, d in zip(nonlocal_, calib)]}
    moved = []
    for kind, experts, cfgs in (("local", local, lcfgs), ("non-local", nonlocal_, ncfgs)):
        for i, (m, c) in enumerate(zip(experts, cfgs)):
            f = founds[0] if kind == "local" else founds[i]
            fs = f.state_dict()
            moved.append({"setting": kind, "task": TASK_LABELS[tasks[i]], "foundation seed": c.foundation.seed,
                          "foundation on the task": evaluate(f, test[i])["accuracy"],
                          "expert accuracy": expert_acc[kind][i],
                          "‖θ_t − θ_found‖ / ‖θ_found‖": state_distance(m.state_dict(), fs)
                          / state_distance(fs, {k: torch.zeros_like(v) for k, v in fs.items()})})
    # the non-local setting modulo permutation: the foundations aligned to foundation 0 (weight matching), each
    # expert moved by its foundation's permutation, the base their average (non-local paper, Fig. 2 centre)
    x = inputs(calib[0], 8)
    alignment = align_many(founds, method="weight", example_input=x, seed=0)
    aligned = [alignment.apply(i, e) for i, e in enumerate(nonlocal_)]
    t0 = tick("align", t0)

    # ---- Figs. 1-2: landscapes over the span of the first two task vectors
    grid = np.linspace(0.0, cfg.grid_max, cfg.n_grid)
    targets = [layer_stats(e, d) for e, d in zip(aligned, calib)]
    settings = {"local": (founds[0], local[:2], "local"),
                "non-local": (average(founds[:2]), nonlocal_[:2], "non-local"),
                "modulo permutation": (average(alignment.aligned[:2]), aligned[:2], "non-local")}
    landscape: dict[str, dict[str, np.ndarray]] = {s: {"mean": np.zeros((len(grid),) * 2),
                                                       "worst": np.zeros((len(grid),) * 2)} for s in LANDSCAPES}
    points = [(i, j) for i in range(len(grid)) for j in range(len(grid))]
    few = [d if len(d) <= LANDSCAPE_IMAGES else calibration_subset(d, LANDSCAPE_IMAGES, seed=3) for d in test[:2]]
    few_acc = {kind: [evaluate(m, d)["accuracy"] for m, d in zip(experts[:2], few)]
               for kind, experts in (("local", local), ("non-local", nonlocal_))}
    for i, j in tqdm(points, desc="landscapes", disable=not progress, leave=False):
        for s in LANDSCAPES:
            base, experts, kind = settings[s.replace(" + TACT", "")]
            mt = task_arithmetic(base, experts, [float(grid[i]), float(grid[j])])
            if s.endswith("TACT"):
                mt = tact(mt, experts, calib[:2], targets=targets[:2])
            norm = [a / e for a, e in zip(_accuracies(mt, few), few_acc[kind])]
            landscape[s]["mean"][i, j], landscape[s]["worst"][i, j] = np.mean(norm), np.min(norm)
    t0 = tick("landscapes (Figs. 1-2)", t0)

    # ---- Fig. 5: normalized accuracy against the number of tasks merged
    picks: dict[str, dict[str, dict[int, Pick]]] = {m: {v: {} for v in VARIANTS} for m in METHODS}
    fits: dict[tuple[str, int], MultiTask] = {}
    # per number of tasks, shared by both methods: the two bases and REPAIR's task-agnostic targets (the aligned
    # experts' average statistics on all n tasks' training images)
    per_n = {}
    for n in range(2, n_tasks + 1):
        mixed = torch.cat([inputs(d) for d in calib[:n]])
        per_n[n] = (average(founds[:n]), average(alignment.aligned[:n]), mixed,
                    weighted_stats([layer_stats(e, mixed) for e in aligned[:n]], [1.0] * n))
    jobs = [(m, n) for m in METHODS for n in range(2, n_tasks + 1)]
    for method, n in tqdm(jobs, desc="merging 2…N tasks", disable=not progress, leave=False):
        base_direct, base_perm, mixed, repair_targets = per_n[n]
        makers: dict[str, Callable[[float], MultiTask]] = {
            "local": lambda s: _merge(method, founds[0], local[:n], s, cfg.ties_density),
            "non-local": lambda s: _merge(method, base_direct, nonlocal_[:n], s, cfg.ties_density),
            "modulo permutation": lambda s: _merge(method, base_perm, aligned[:n], s, cfg.ties_density),
            "+ REPAIR": lambda s: (lambda mt: mt.with_body(repair(mt.body, data=mixed, targets=repair_targets)))(
                _merge(method, base_perm, aligned[:n], s, cfg.ties_density)),
            "+ TACT": lambda s: tact(_merge(method, base_perm, aligned[:n], s, cfg.ties_density), aligned[:n],
                                     calib[:n], targets=targets[:n]),
        }
        for variant, make in makers.items():
            kind = "local" if variant == "local" else "non-local"
            best, best_score, best_model = None, -1.0, None
            for s in cfg.scales:
                mt = make(s)
                score = float(np.mean([a / e for a, e in zip(_accuracies(mt, calib[:n]), expert_calib[kind])]))
                if score > best_score + 1e-12:
                    best, best_score, best_model = s, score, mt
            acc = _accuracies(best_model, test[:n])
            picks[method][variant][n] = Pick(best, acc, [a / e for a, e in zip(acc, expert_acc[kind])])
            if variant == "modulo permutation":
                fits[(method, n)] = best_model
        probed = linear_probe(fits[(method, n)], calib[:n])
        acc = _accuracies(probed, test[:n])
        picks[method]["+ linear probe"][n] = Pick(picks[method]["modulo permutation"][n].scale, acc,
                                                  [a / e for a, e in zip(acc, expert_acc["non-local"])])
    t0 = tick("merging 2…N tasks (Fig. 5)", t0)

    # ---- TALL masks on all tasks: Task Arithmetic's vector at its chosen λ, one mask per task
    tall_rows = []
    local_targets = [layer_stats(e, d) for e, d in zip(local, calib)]
    for setting, base, experts, kind, goal in (("local", founds[0], local, "local", local_targets),
                                               ("modulo permutation", average(alignment.aligned), aligned,
                                                "non-local", targets)):
        scale = picks["Task Arithmetic"][setting][n_tasks].scale
        best_lam, best_score, best_model = None, -1.0, None
        for lam in TALL_LAMBDAS:
            model = tall_merging(base, experts, scale, lam)
            score = float(np.mean([a / e for a, e in zip(_accuracies(model, calib), expert_calib[kind])]))
            if score > best_score + 1e-12:
                best_lam, best_score, best_model = lam, score, model
        kept = [float(np.mean([float(m.float().mean()) for m in masks.as_dict().values()]))
                for masks in best_model.masks]
        row = {"setting": setting, "λ (TA)": scale, "λ (TALL)": best_lam,
               "Task Arithmetic": picks["Task Arithmetic"][setting][n_tasks].mean}
        for label, model in (("TALL masks", best_model),
                             ("TALL masks + TACT", tact(best_model, experts, calib, targets=goal))):
            row[label] = float(np.mean([a / e for a, e in zip(_accuracies(model, test), expert_acc[kind])]))
        row["weights kept per task"] = float(np.mean(kept))
        tall_rows.append(row)
    t0 = tick("TALL masks", t0)

    # ---- Fig. 3, Fig. 4 and the vanishing feature: Task Arithmetic of (up to) 4 tasks modulo permutation
    k = min(4, n_tasks)
    merged = fits[("Task Arithmetic", k)]
    corrected = tact(merged, aligned[:k], calib[:k], targets=targets[:k])
    gap = {"merged": [activation_gap(merged.for_task(t), aligned[t], test[t]) for t in range(k)],
           "TACT": [activation_gap(corrected.for_task(t), aligned[t], test[t]) for t in range(k)]}
    vf = {"merged": [vf_curve(merged.for_task(t), [aligned[t]], test[t]) for t in range(k)],
          "TACT": [vf_curve(corrected.for_task(t), [aligned[t]], test[t]) for t in range(k)]}
    t0 = tick("statistics and VF (Fig. 3)", t0)

    from sklearn.manifold import TSNE
    sample = calibration_subset(test[0], min(cfg.n_tsne, len(test[0])), seed=2)
    emb = {"expert": features(aligned[0], sample), "merged": features(merged.for_task(0), sample),
           "merged + TACT": features(corrected.for_task(0), sample)}
    z_e = emb["expert"][0]
    distance = {name: float((z - z_e).norm(dim=1).mean() / z_e.norm(dim=1).mean()) for name, (z, _) in emb.items()}
    stacked = torch.cat([z for z, _ in emb.values()]).numpy()
    coords = TSNE(n_components=2, init="pca", random_state=0,
                  perplexity=float(min(30, max(2, len(stacked) // 4)))).fit_transform(stacked)
    n_s = len(z_e)
    tsne = {name: coords[i * n_s:(i + 1) * n_s] for i, name in enumerate(emb)}
    t0 = tick("t-SNE (Fig. 4)", t0)

    # ---- which alignment of the foundations: one reference, or Git Re-Basin's MergeMany
    alignments = []
    for strategy in ("reference", "mean"):
        al = alignment if strategy == "reference" else align_many(founds, method="weight", strategy="mean",
                                                                  example_input=x, seed=0, max_rounds=MERGE_MANY_ROUNDS)
        ex = [al.apply(i, e) for i, e in enumerate(nonlocal_)]
        mt = task_arithmetic(al.merge(), ex, picks["Task Arithmetic"]["modulo permutation"][n_tasks].scale)
        acc = _accuracies(mt, test)
        tacc = _accuracies(tact(mt, ex, calib, targets=targets if strategy == "reference" else None), test)
        alignments.append({"alignment of the foundations": "to foundation 0" if strategy == "reference"
                           else f"MergeMany ({al.rounds} rounds, " + ("converged)" if al.converged else "not converged)"),
                           "foundations' average: accuracy": evaluate(al.merge(), ftest)["accuracy"],
                           f"TA of {n_tasks} tasks": float(np.mean([a / e for a, e in zip(acc, expert_acc['non-local'])])),
                           "+ TACT": float(np.mean([a / e for a, e in zip(tacc, expert_acc['non-local'])]))})
    tick("alignment strategies", t0)
    seconds["total"] = time.perf_counter() - t_all
    return MultiTaskResult(cfg, tasks, expert_acc, [evaluate(f, ftest)["accuracy"] for f in founds], moved, grid,
                           landscape, picks, gap, k, tsne, emb["expert"][1].numpy(), distance, vf, alignments,
                           tall_rows, sum(len(d) for d in test), founds, local, nonlocal_, alignment, aligned, calib, test, seconds)


# ---------------------------------------------------------------------------------------------------------------
# report
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _small(v: float) -> str:
    """A ratio that may be tiny: two decimals, or scientific notation below 0.01."""
    return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def experts_table(res: MultiTaskResult) -> list[dict[str, Any]]:
    """Every expert: its foundation, accuracy before and after fine-tuning, and how far its weights moved."""
    rows = []
    for r in res.moved:
        rows.append({"expert": r["setting"], "task": r["task"], "foundation (seed)": r["foundation seed"],
                     "foundation on the task (%)": _pct(r["foundation on the task"]),
                     "expert (%)": _pct(r["expert accuracy"]),
                     "moved ‖θ_t − θ_f‖ / ‖θ_f‖": f"{r['‖θ_t − θ_found‖ / ‖θ_found‖']:.2f}"})
    return rows


def tasks_table(res: MultiTaskResult, method: str = "Task Arithmetic") -> list[dict[str, Any]]:
    """Fig. 5 as numbers: per setting and number of tasks merged, the mean (worst) normalized accuracy in %, and
    the task-vector scale λ that the training images chose."""
    rows = []
    for v in VARIANTS:
        row: dict[str, Any] = {"setting": v}
        for n, p in res.picks[method][v].items():
            row[f"{n} tasks"] = f"{_pct(p.mean)} ({_pct(p.worst)}) λ={p.scale:g}"
        rows.append(row)
    return rows


def vf_table(res: MultiTaskResult) -> list[dict[str, Any]]:
    """Per task of the Fig. 3 merge: variance ratio of the last hidden activations, E_L and ε_L (Def. 5.1),
    before and after TACT."""
    rows = []
    for t in range(res.gap_tasks):
        row: dict[str, Any] = {"task": res.labels[t]}
        for k in ("merged", "TACT"):
            tag = "" if k == "merged" else " + TACT"
            row[f"variance ratio, last hidden{tag}"] = _small(res.gap[k][t][-1]["variance ratio"])
            row[f"E_L{tag}"] = _small(float(res.vf[k][t].ratio[-1]))
            row[f"ε_L{tag}"] = _small(float(res.vf[k][t].bound[-1]))
        rows.append(row)
    return rows


def tall_table(res: MultiTaskResult) -> list[dict[str, Any]]:
    """TALL masks on all tasks: average normalized accuracy (%) of Task Arithmetic, of its TALL-masked networks and
    of those with TACT, the λs chosen on training images, and the share of weights each task's mask keeps."""
    out = []
    for r in res.tall:
        out.append({k: (_pct(v) if isinstance(v, float) and k not in ("λ (TA)", "λ (TALL)") else v)
                    for k, v in r.items()})
        out[-1]["weights kept per task"] = f"{_pct(r['weights kept per task'])} %"
    return out


def alignment_table(res: MultiTaskResult) -> list[dict[str, Any]]:
    """Aligning the foundations to foundation 0, or by Git Re-Basin's MergeMany: normalized accuracy (%) of Task
    Arithmetic of all tasks at the λ of Fig. 5, plain and with TACT."""
    return [{k: (_pct(v) if isinstance(v, float) else v) for k, v in r.items()} for r in res.alignments]


def plot_landscapes(res: MultiTaskResult, kind: str = "mean"):
    """Figs. 1 (``kind="mean"``) and 2 (``"worst"``): normalized accuracy over θ_base + λ₁τ₁ + λ₂τ₂, per setting."""
    from ..plots import figure
    if kind not in ("mean", "worst"):
        raise ValueError(f"kind is 'mean' or 'worst', got {kind!r}")
    fig, axes = figure(2, width=3.2, height=2.9, nrows=2)
    g = res.grid
    image = None
    for ax, s in zip(axes, LANDSCAPES):
        z = res.landscape[s][kind]
        image = ax.imshow(z.T, origin="lower", extent=(g[0], g[-1], g[0], g[-1]), vmin=0, vmax=1, cmap="viridis",
                          aspect="equal", interpolation="bilinear")
        ax.contour(g, g, z.T, levels=[0.5, 0.8], colors="white", linewidths=0.8)
        i, j = np.unravel_index(np.argmax(z), z.shape)
        ax.plot([g[i]], [g[j]], marker="*", color="#e74c3c", ms=9, clip_on=False)
        ax.set_title(f"{s}\nbest {_pct(z.max())} % at λ = ({g[i]:.2g}, {g[j]:.2g})", fontsize=9)
        ax.set_xlabel(f"λ₁ ({res.labels[0]})")
        ax.set_ylabel(f"λ₂ ({res.labels[1]})")
        ax.grid(False)
    fig.colorbar(image, ax=list(axes), shrink=0.8,
                 label=("average" if kind == "mean" else "worst-case") + " normalized accuracy")
    return fig


def plot_gap(res: MultiTaskResult):
    """Fig. 3: per layer, the relative ℓ2 distance between the merged model's and the expert's activations on the
    expert's task, and the ratio of their variances (log scale); solid: merged, dashed: + TACT."""
    from ..plots import figure
    fig, axes = figure(2, width=3.2, height=2.8)
    cmap = TASK_COLORS
    for t in range(res.gap_tasks):
        for k, ls in (("merged", "-"), ("TACT", "--")):
            rows = res.gap[k][t]
            d = [r["depth"] for r in rows]
            label = res.labels[t] if k == "merged" else None
            axes[0].plot(d, [r["distance"] for r in rows], ls=ls, marker="o", color=cmap[t], label=label)
            axes[1].plot(d, [max(r["variance ratio"], 1e-6) for r in rows], ls=ls, marker="o", color=cmap[t])
    axes[0].set_ylabel("‖a_merged − a_expert‖ / ‖a_expert‖")
    axes[1].set_ylabel("Var(a_merged) / Var(a_expert)")
    axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="black", lw=0.8)
    for ax in axes:
        ax.set_xlabel("layer l (activations after it)")
    axes[0].legend(title="solid: merged\ndashed: + TACT", loc="upper left")
    return fig


def plot_tsne(res: MultiTaskResult):
    """Fig. 4: t-SNE of the last-layer embeddings of one task's test images (one joint embedding, one panel per
    model), coloured by class."""
    from ..plots import figure
    fig, axes = figure(3, width=2.2, height=2.3)
    for ax, (name, xy) in zip(axes, res.tsne.items()):
        ax.scatter(xy[:, 0], xy[:, 1], c=res.tsne_labels, cmap="tab10", s=5, vmin=0, vmax=9)
        ax.set_title(f"{name}\ndistance to expert {res.embedding_distance[name]:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    return fig


def plot_tasks(ax, res: MultiTaskResult, method: str) -> None:
    """Fig. 5: average normalized accuracy against the number of tasks merged, one line per setting."""
    for v in VARIANTS:
        byn = res.picks[method][v]
        ns = sorted(byn)
        ax.plot(ns, [byn[n].mean for n in ns], marker="o", color=COLORS[v], label=v,
                ls="--" if v == "local" else "-")
    ax.set_xticks(sorted(res.picks[method][VARIANTS[0]]))
    top = max(byn[n].mean for v in VARIANTS for byn in (res.picks[method][v],) for n in byn)
    ax.set_ylim(0, max(1.05, 1.05 * top))  # a setting may beat its experts (the probe, at small scale)
    ax.set_xlabel("tasks merged")
    ax.set_ylabel("average normalized accuracy")
    ax.set_title(method)


def tasks_figure(res: MultiTaskResult):
    """Fig. 5 for Task Arithmetic and TIES, the legend below the panels."""
    from ..plots import figure
    fig, axes = figure(2, width=3.2, height=2.8)
    for ax, m in zip(axes, METHODS):
        plot_tasks(ax, res, m)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3)
    return fig


def plot_vf(res: MultiTaskResult):
    """Def. 5.1's bound ε per layer for each task's merged model against its expert: solid merged, dashed + TACT."""
    from ..plots import figure
    fig, axes = figure(1, width=6.4, height=2.8)
    ax = axes[0]
    cmap = TASK_COLORS
    for t in range(res.gap_tasks):
        for k, ls in (("merged", "-"), ("TACT", "--")):
            c = res.vf[k][t]
            ax.plot(c.relative_depth, np.maximum(c.bound, 1e-4), ls=ls, marker="o", ms=3, color=cmap[t],
                    label=res.labels[t] if k == "merged" else None)
    ax.set_yscale("log")
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlabel("relative depth l/L (conv and linear outputs)")
    ax.set_ylabel("ε_l (bound on E_l)")
    ax.legend(title="solid: merged, dashed: + TACT", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def render_explorer(res: MultiTaskResult, n: int):
    """The explorer's figure for ``n`` tasks merged by Task Arithmetic: normalized accuracy per task and setting."""
    from ..plots import figure
    fig, axes = figure(1, width=6.4, height=3.0)
    ax = axes[0]
    width = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        p = res.picks["Task Arithmetic"][v][n]
        xs = np.arange(n) + (k - (len(VARIANTS) - 1) / 2) * width
        ax.bar(xs, p.normalized, width=width, color=COLORS[v], label=f"{v} ({_pct(p.mean)} %)")
    ax.set_xticks(np.arange(n), res.labels[:n])
    top = max(float(np.max(res.picks["Task Arithmetic"][v][n].normalized)) for v in VARIANTS)
    ax.set_ylim(0, max(1.1, 1.05 * top))
    ax.set_ylabel("normalized accuracy")
    ax.set_title(f"Task Arithmetic of {n} tasks (λ chosen per setting on training images)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _clip(v: float) -> float:
    return min(max(float(v), 0.0), 1.0)


def _less(c: Claims, a: float, b: float, n: int, noise: tuple[float, float] | None = None) -> claims_mod.Verdict:
    """``a < b`` beyond the binomial noise of two accuracies on ``n`` test images (normalized accuracies, and
    differences of them, may leave [0, 1], so the margin is taken at the accuracies ``noise``, default ``a`` and
    ``b``, clipped)."""
    x, y = noise if noise is not None else (a, b)
    if abs(a - b) <= c.margin(_clip(x), _clip(y), n):
        return claims_mod.TIE
    return bool(a < b)


def _n(res: MultiTaskResult, tasks: int) -> int:
    """Test images behind a normalized accuracy averaged over the first ``tasks`` tasks."""
    return sum(len(d) for d in res.test[:tasks])


def claims(res: MultiTaskResult) -> list[dict[str, str]]:
    """The non-local paper's statements, checked at this scale, and the book's own on the vanishing feature."""
    ta = res.picks["Task Arithmetic"]
    N = max(ta["local"])
    nN, n2 = _n(res, N), _n(res, 2)
    c = Claims()
    loc, nl, perm, tc = (ta[v][N].mean for v in ("local", "non-local", "modulo permutation", "+ TACT"))
    c.add(f"Local merging works: Task Arithmetic of experts fine-tuned from one foundation keeps most of their "
          f"accuracy ({N} tasks)", bool(loc >= MOST),
          f"average normalized accuracy {_pct(loc)} % (worst task {_pct(ta['local'][N].worst)} %)",
          paper="VGG16, 2 tasks: high accuracy in the span of the task vectors (Fig. 1 left)")
    c.add("Non-local merging fails, with or without permutation: it keeps less than half of the experts' accuracy, "
          "below the local merge",
          claims_mod.all_of(bool(max(nl, perm) < MOST), _less(c, nl, loc, nN), _less(c, perm, loc, nN)),
          f"non-local {_pct(nl)} %, modulo permutation {_pct(perm)} %, local {_pct(loc)} % ({N} tasks)",
          paper="Figs. 1-2 centre: low accuracy throughout the span")
    if _less(c, perm, loc, nN) is not True:
        verdict: claims_mod.Verdict = claims_mod.TIE
        evidence = (f"no gap to recover: modulo permutation {_pct(perm)} % is not below local {_pct(loc)} % beyond "
                    f"noise; + TACT {_pct(tc)} %")
    else:
        closed = (tc - perm) / (loc - perm)
        verdict = bool(closed >= MOST)
        evidence = (f"+ TACT {_pct(tc)} %: {_pct(closed)} % of the gap from modulo permutation ({_pct(perm)} %) to "
                    f"local ({_pct(loc)} %)")
    c.add("TACT recovers most of the gap", verdict, evidence, paper="Fig. 5 left; Fig. 2 right")
    rep, plain = ta["+ REPAIR"], ta["modulo permutation"]
    gain2, gainN = rep[2].mean - plain[2].mean, rep[N].mean - plain[N].mean
    c.add("REPAIR helps when few tasks are merged and degrades as more are added",
          claims_mod.all_of(_less(c, plain[2].mean, rep[2].mean, n2), _less(c, rep[N].mean, rep[2].mean, n2),
                            _less(c, gainN, gain2, n2, (rep[N].mean, rep[2].mean))),
          f"+ REPAIR {_pct(rep[2].mean)} % at 2 tasks, {_pct(rep[N].mean)} % at {N}; its gain over the uncorrected merge "
          f"{100 * gain2:+.1f} points at 2 tasks, {100 * gainN:+.1f} at {N}", paper="Fig. 5 centre")
    lp = ta["+ linear probe"][N].mean
    c.add("Linear probing of the heads helps less than TACT", _less(c, lp, tc, nN),
          f"+ linear probe {_pct(lp)} %, + TACT {_pct(tc)} % ({N} tasks; both fitted on the same "
          f"{res.cfg.task_calib} training images per task)", paper="Fig. 5 right")
    k = res.gap_tasks
    var, var_t = ([res.gap[m][t][-1]["variance ratio"] for t in range(k)] for m in ("merged", "TACT"))
    eps, eps_t = ([float(res.vf[m][t].bound[-1]) for t in range(k)] for m in ("merged", "TACT"))
    c.add(f"(this book) Variance collapse in the non-local merge is the vanishing feature: on every task the "
          f"variance collapses (ratio < {COLLAPSE}) and the feature vanishes (ε_L < 0.5), and TACT reverses both "
          f"(each at least {REVIVAL:g}× larger)",
          _together(var, var_t, eps, eps_t),
          f"ε_L {', '.join(_small(e) for e in eps)} before TACT, {', '.join(_small(e) for e in eps_t)} after; "
          f"variance ratio of the last hidden activations {', '.join(_small(v) for v in var)} before, "
          f"{', '.join(_small(v) for v in var_t)} after")
    return c.table()


#: Variance collapse: the merged activations keep less than this fraction of the expert's variance; a reversal
#: multiplies the variance ratio and ε_L by at least REVIVAL.
COLLAPSE = 0.1
REVIVAL = 10.0


def _together(var: list[float], var_t: list[float], eps: list[float], eps_t: list[float]) -> bool:
    """Both measures show the collapse on every task, and TACT reverses both on every task."""
    return bool(max(var) < COLLAPSE and max(eps) < 0.5
                and all(b >= REVIVAL * a for a, b in zip(var, var_t))
                and all(b >= REVIVAL * a for a, b in zip(eps, eps_t)))


def notes(res: MultiTaskResult) -> dict[str, str]:
    """One Markdown paragraph per part of the chapter, with this run's numbers; every judgement in the text is
    computed from them."""
    out: dict[str, str] = {}
    loc = [r for r in res.moved if r["setting"] == "local"]
    nl = [r for r in res.moved if r["setting"] == "non-local"]
    key = "‖θ_t − θ_found‖ / ‖θ_found‖"
    far = max(res.moved, key=lambda r: r[key])
    unable = [r for r in loc if r["foundation on the task"] < 0.5]
    out["experts"] = (
        f"The foundations reach {', '.join(_pct(a) for a in res.foundation_accuracy)} % on the digits they were "
        f"trained on. Fine-tuning moved the experts' weights by {min(r[key] for r in res.moved):.2f} to "
        f"{far[key]:.2f} of their foundation's norm, most for {far['task']}. "
        + (f"Foundation {loc[0]['foundation seed']} cannot do {', '.join(r['task'] for r in unable)} at all "
           f"({', '.join(_pct(r['foundation on the task']) for r in unable)} %), and those experts moved "
           f"{', '.join(f'{r[key]:.2f}' for r in unable)}. " if unable else "")
        + f"The local experts score {_pct(float(np.mean([r['expert accuracy'] for r in loc])))} % on average, the "
        f"non-local ones {_pct(float(np.mean([r['expert accuracy'] for r in nl])))} %.")
    L = res.landscape
    best = {s: (L[s]["mean"].max(), L[s]["worst"].max()) for s in LANDSCAPES}
    ends = bool(np.isclose(res.grid, 1.0).any() and np.isclose(res.grid, 0.0).any())
    lift = best["modulo permutation"][1] - best["non-local"][1]
    lift_t = best["modulo permutation + TACT"][1] - best["modulo permutation"][1]
    out["landscape"] = (
        "Best average (worst-task) normalized accuracy over the grid: "
        + "; ".join(f"{s} {_pct(m)} % ({_pct(w)} %)" for s, (m, w) in best.items()) + ". "
        + ("At λ = (1, 0) and (0, 1) a merge is one of its experts (θ_base + τ_t = θ_t), which does its own task and "
           "the other only as well as that expert happens to, so the average landscape is never low there; the "
           "worst-task landscape is the one that shows whether both tasks survive. "
           if ends else "")
        + f"Aligning the foundations modulo permutation {'lifts' if lift > 0.05 else 'barely changes'} the best worst "
        f"case ({_pct(best['non-local'][1])} → {_pct(best['modulo permutation'][1])} %), and TACT "
        f"{'lifts it further' if lift_t > 0.05 else 'barely changes it'} ({_pct(best['modulo permutation + TACT'][1])} %)"
        + (", above the local merge's." if best["modulo permutation + TACT"][1] > best["local"][1] + 0.05 else
           ", to about the local merge's." if best["modulo permutation + TACT"][1] > best["local"][1] - 0.05 else
           ", below the local merge's."))
    ta = res.picks["Task Arithmetic"]
    N = max(ta["local"])
    k = res.gap_tasks
    first = [res.gap["merged"][t][0]["variance ratio"] for t in range(k)]
    last = [res.gap["merged"][t][-1]["variance ratio"] for t in range(k)]
    last_t = [res.gap["TACT"][t][-1]["variance ratio"] for t in range(k)]
    falls = all(b < a for a, b in zip(first, last))
    out["gap"] = (
        f"Task Arithmetic of {k} tasks modulo permutation (λ = {ta['modulo permutation'][k].scale:g}). Relative to the "
        f"expert's, the variance of the merged activations is {', '.join(_small(v) for v in first)} after the first "
        f"layer and {', '.join(_small(v) for v in last)} after the last hidden one"
        + (": it falls with depth on every task, the variance collapse of the non-local paper. " if falls else
           ": it does not fall with depth on every task. ")
        + f"With TACT the last ratios are {', '.join(_small(v) for v in last_t)}. TACT fixes the mean and standard "
        "deviation of every channel before its ReLU, so the variance after ReLU and pooling need not be exactly 1, "
        "and it brings the activations closer to the expert's without making them equal: the two networks share "
        "the statistics, not the function.")
    d = res.embedding_distance
    out["tsne"] = (
        f"On {res.labels[0]}, the merged network's embeddings lie at a relative distance of {d['merged']:.2f} from the "
        f"expert's, TACT's at {d['merged + TACT']:.2f} (a distance of 1 is as large as the expert's embeddings "
        "themselves).")
    rows = {v: ta[v][N] for v in VARIANTS}
    order = sorted(VARIANTS, key=lambda v: -rows[v].mean)
    ties = res.picks["TIES"]
    out["tasks"] = (
        f"With all {N} tasks, Task Arithmetic keeps on average "
        + ", ".join(f"{_pct(rows[v].mean)} % ({v})" for v in order)
        + f" of the experts' accuracy; TIES {', '.join(f'{_pct(ties[v][N].mean)} % ({v})' for v in order)}. "
        f"REPAIR corrects every task toward the average of the experts' statistics on all tasks' images; TACT "
        f"corrects each task toward its own expert, and the linear probe refits each head on the merged features "
        f"({res.cfg.task_calib} labelled training images per task, the images TACT uses).")
    var = [res.gap["merged"][t][-1]["variance ratio"] for t in range(k)]
    eps = [float(res.vf["merged"][t].bound[-1]) for t in range(k)]
    eps_t = [float(res.vf["TACT"][t].bound[-1]) for t in range(k)]
    size = ("a few per cent or less of" if max(eps) < 0.05 else "less than half of" if max(eps) < 0.5 else
            "not much less than" if max(eps) < 1 else "as large as or larger than")
    out["vf"] = (
        f"Before TACT, ε_L is {', '.join(_small(e) for e in eps)}: the input-induced part of the merged network's "
        f"output is {size} the expert's on its own task. After TACT it is {', '.join(_small(e) for e in eps_t)}. "
        + ("In this run the two measures move together: on every task the variance collapses and the feature "
           "vanishes, and TACT reverses both. That is expected rather than a coincidence: E‖g‖ measures the spread of "
           "the output around f(0), and activations that lose their variance layer after layer lose that spread. "
           "Variance collapse is the vanishing feature seen through second moments, and TACT, like REPAIR, works by "
           "restoring it." if _together(var, last_t, eps, eps_t) else
           "In this run the two measures do not move together on every task, so variance collapse and the "
           "vanishing feature should be told apart here."))
    tl = {r["setting"]: r for r in res.tall}
    out["tall"] = (
        f"With all {N} tasks, the local TALL-masked networks keep {_pct(tl['local']['TALL masks'])} % of the experts' "
        f"accuracy (Task Arithmetic alone {_pct(tl['local']['Task Arithmetic'])} %), each from "
        f"{_pct(tl['local']['weights kept per task'])} % of the merged vector's entries. Modulo permutation they keep "
        f"{_pct(tl['modulo permutation']['TALL masks'])} % (Task Arithmetic {_pct(tl['modulo permutation']['Task Arithmetic'])} "
        f"%), and {_pct(tl['modulo permutation']['TALL masks + TACT'])} % with TACT. "
        + ("Masks alone do not make the non-local merge work: they choose which entries each task keeps, but the kept "
           "entries still sum vectors from different foundations."
           if tl["modulo permutation"]["TALL masks"] < MOST else
           "Here the masks alone make the non-local merge work."))
    a = res.alignments
    out["alignment"] = (
        f"Aligning every foundation to foundation 0 gives {_pct(a[0][f'TA of {N} tasks'])} % before TACT and "
        f"{_pct(a[0]['+ TACT'])} % after; Git Re-Basin's MergeMany gives {_pct(a[1][f'TA of {N} tasks'])} % and "
        f"{_pct(a[1]['+ TACT'])} %. The chapter uses the first, which costs one weight matching per foundation.")
    return out
