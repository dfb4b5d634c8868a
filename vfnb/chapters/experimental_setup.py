"""Paper §3 (experimental setup): tables generated from ``vfnb.config`` and ``vfnb.train``.

Nothing here is typed by hand: every row is read from the profiles (``EXPERIMENTS``), the
training recipes (``PAPER_RECIPES``, ``PROFILE_CNN``, :func:`vfnb.train.recipe`), the chapters'
architecture lists, the datasets themselves and the zoo. The chapter's own config takes only where
things live; the CNN edge models are those of chapter ``preliminaries`` at the same profile
(:func:`cnn_config`), the MLPs those of ``linear_networks``.
"""
from __future__ import annotations

from typing import Any

from ..config import EXPERIMENTS, PROFILES, Config, resolve
from ..data import DATASETS, NORMALIZATION, load_dataset
from ..models import build_model
from ..train import PAPER_RECIPES, PROFILE_CNN, RESNET_LN_CNN, TRANSFORMER_RECIPES, data_kwargs, recipe
from ..zoo import get_or_train, info, resolve_device
from . import linear_networks, merging_through_vf, pruning, vanishing_feature
from .pruning import CONVNEXT_LAYER_SCALE
from .common import BOOK_ARCHITECTURES, check_config, width_for
from .common import edge_configs as common_edge_configs

#: The architectures (labels of :data:`vfnb.chapters.common.ARCHS`) of the chapters that take widths only.
CHAPTER_ARCHS: dict[str, tuple[str, ...]] = {"vanishing_feature": vanishing_feature.FIG3B,
                                             "merging_through_vf": merging_through_vf.ARCH_LABELS}


def cnn_config(cfg: Config) -> Config:
    """The ``preliminaries`` config at ``cfg``'s profile (its CNN recipe is every chapter's), with ``cfg``'s
    data root, device and cache."""
    check_config(cfg, "experimental_setup")
    return resolve("preliminaries", cfg.profile, data_root=cfg.data_root, device=cfg.device, cache_dir=cfg.cache_dir)


def models_text(chapter: str, profile: str) -> str:
    """The edge models ``chapter`` trains at ``profile``, in words (the experiment table's model column)."""
    d = EXPERIMENTS[chapter][profile]
    if chapter == "introduction":
        return "as linear_networks: " + models_text("linear_networks", profile)
    if chapter == "experimental_setup":
        return "every edge model of the book (see the zoo table)"
    if chapter == "conclusion":
        return "none: it gathers the other chapters' recorded claims"
    if chapter == "reproduction":
        return "those of 5.3 and 5.4, over three seed pairs (committed sweep results)"
    if chapter == "multitask_merging":
        return (f"{d['model']} (norm none), width ×{d['model_width']}: {len(d['seeds'])} foundations and "
                f"{2 * len(d['tasks']) - 1} experts fine-tuned on {len(d['tasks'])} tasks for {d['finetune_epochs']} "
                f"epoch(s)")
    if chapter == "training_recipe":
        archs = ", ".join(a.replace("VGG", d["model"]) for a in d["lr_archs"] if a != "ResNet20-LN")
        if "ResNet20-LN" in d["lr_archs"]:
            archs += f" (and ResNet20-LN ×{4 * d['model_width']:g})"
        return (f"{archs}, width ×{d['model_width']}; vgg16-LN, width "
                f"×{d['rebasin_width']} (Git Re-Basin's recipe, {d['rebasin_epochs']} epochs)")
    parts = []
    if "vit_depth" in d:
        hidden = d["num_heads"] * max(1, round(96 * d["model_width"] / d["num_heads"]))
        parts.append(f"ViT, {d['vit_depth']} blocks, hidden {hidden} in {d['num_heads']} heads, "
                     f"{d['patch_size']}×{d['patch_size']} patches")
    if "depth" in d:
        parts.append(f"linear mlp, depth {d['depth']}, width {d['width']}")
    if "model" in d:
        if chapter == "pruning":
            norms = ", ".join(n.upper() for n in pruning.SETTINGS)
        else:
            norms = d.get("norm", "none")
        parts.append(f"{d['model']} (norm {norms}), width ×{d['model_width']}")
    if chapter in CHAPTER_ARCHS:
        labels = CHAPTER_ARCHS[chapter]
        for family, key in (("VGG", "model_width"), ("ResNet", "resnet_width")):
            own = [label for label in labels if label.startswith(family)]
            if own:
                parts.append(f"{', '.join(own)}, width ×{d[key]}")
    elif "resnet_width" in d:
        parts.append(f"ResNet20 (norm bn), width ×{d['resnet_width']}")
    if "mlp_depth" in d:
        parts.append(f"linear mlp (plain and residual), depth {d['mlp_depth']}, width {d['mlp_width']}")
    if "convnext_width" in d:
        parts.append(f"ConvNeXt, width ×{d['convnext_width']} ({d['convnext_epochs']} epochs)")
    if not parts:
        raise ValueError(f"no description of chapter {chapter!r}'s models; extend vfnb.chapters.experimental_setup."
                         "models_text")
    return "; ".join(parts)


def experiment_table() -> list[dict[str, Any]]:
    """Per chapter and profile: dataset, data sizes, edge seeds, models and recipe (blank where a chapter
    does not have that parameter)."""
    rows = []
    for name, profiles in EXPERIMENTS.items():
        for p in PROFILES:
            d = profiles[p]
            size = lambda k: "all" if d.get(k, "") is None else d.get(k, "")  # noqa: E731
            rows.append({"chapter": name, "profile": p, "dataset": d.get("dataset", ""),
                         "train images": size("n_train"), "test images": size("n_test"),
                         "seeds": str(d.get("seeds", d.get("seed", ""))), "model": models_text(name, p),
                         "epochs": d.get("epochs", ""), "lr": d.get("lr", ""),
                         "weight decay": d.get("weight_decay", ""), "α grid points": d.get("n_alphas", "")})
    return rows


def dataset_table(data_root: Any = None) -> list[dict[str, Any]]:
    """Per dataset of ``vfnb.data``: split sizes, image shape, classes, normalization (if present here)."""
    rows = []
    for name in DATASETS:
        mean, std = NORMALIZATION[name]
        row: dict[str, Any] = {"dataset": name}
        try:
            tr, te = load_dataset(name, "train", root=data_root), load_dataset(name, "test", root=data_root)
            row.update({"train": len(tr), "test": len(te), "image": f"{tr.in_channels}×{tr.image_size}×{tr.image_size}",
                        "classes": tr.num_classes, "augmentation (train)": "crop + flip" if tr.augment else "none"})
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            row.update({"train": "not on this machine", "test": "", "image": "", "classes": "",
                        "augmentation (train)": type(exc).__name__})
        row["normalization mean / std"] = f"{tuple(round(m, 4) for m in mean)} / {tuple(round(s, 4) for s in std)}"
        rows.append(row)
    return rows


def recipe_table() -> list[dict[str, Any]]:
    """The training recipe of each model family under each profile, as :func:`vfnb.train.recipe` builds it."""
    rows = []
    for family, model, kw in (("mlp", "mlp", {}), ("cnn (VGG, ResNet20-BN)", "vgg16", {}),
                              ("ResNet20-LN", "resnet20", {"norm": "ln"}), ("ViT (appendix A.8.4)", "vit", {})):
        for p in PROFILES:
            c = recipe(model, p, **kw)
            rows.append({"family": family, "profile": p, "dataset (default)": c.dataset, "optimizer": c.optimizer,
                         "lr": c.lr, "schedule": c.schedule, "batch": c.batch_size, "weight decay": c.weight_decay,
                         "gradient clip": "none" if c.grad_clip is None else c.grad_clip, "epochs": c.epochs, "train images": "all" if c.n_train is None else c.n_train,
                         "width ×": c.model_kwargs.get("width", "")})
    return rows


def source_table() -> list[dict[str, Any]]:
    """The raw dictionaries the recipe table is built from (``PAPER_RECIPES`` and ``PROFILE_CNN``)."""
    rows = [{"source": f"PAPER_RECIPES[{k!r}]", **{f: v for f, v in r.items()}} for k, r in PAPER_RECIPES.items()]
    rows += [{"source": f"PROFILE_CNN[{k!r}]", **r} for k, r in PROFILE_CNN.items()]
    rows += [{"source": f"RESNET_LN_CNN[{k!r}] (after PROFILE_CNN)", **r} for k, r in RESNET_LN_CNN.items()]
    rows += [{"source": f"TRANSFORMER_RECIPES[{k!r}]", **{f: v for f, v in r.items() if f != "model_kwargs"},
              **r["model_kwargs"]} for k, r in TRANSFORMER_RECIPES.items()]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in keys} for r in rows]


def model_table(cfg: Config) -> list[dict[str, Any]]:
    """The edge architectures of the chapters at ``cfg.profile``: layers and parameter counts."""
    rows = []
    ccfg = cnn_config(cfg)
    data = load_dataset(ccfg.dataset, "test", root=ccfg.data_root)
    for exp, configs in edge_configs(cfg).items():
        c = configs[0]
        m = build_model(c.model, **{**c.model_kwargs, **data_kwargs(c.model, data.in_channels, data.image_size,
                                                                      data.num_classes)})
        n_layers = sum(1 for mod in m.modules() if type(mod).__name__ in ("Conv2d", "Linear"))
        rows.append({"edge model": exp, "model": c.model, "arguments": str(c.model_kwargs),
                     "conv + linear modules (with shortcuts)": n_layers, "parameters": sum(p.numel() for p in m.parameters())})
    return rows


def edge_configs(cfg: Config) -> dict[str, list]:
    """The edge-model configurations the chapters train at ``cfg.profile``: the linear MLPs of §4 and
    every CNN of :data:`~vfnb.chapters.common.BOOK_ARCHITECTURES` (§2 and §5)."""
    check_config(cfg, "experimental_setup")
    lcfg = resolve("linear_networks", profile=cfg.profile, data_root=cfg.data_root, cache_dir=cfg.cache_dir)
    ccfg = cnn_config(cfg)
    out = {"linear MLP (§4)": linear_networks.edge_configs(lcfg)}
    for model, norm in BOOK_ARCHITECTURES:
        name = {"vgg16": "VGG16", "resnet20": "ResNet20"}.get(model, model) + ("" if norm == "none" else f"-{norm.upper()}")
        out[name] = common_edge_configs(ccfg, model=model, norm=norm, width=width_for(ccfg, model))
    return out


def edge_table(cfg: Config, progress: bool = True) -> list[dict[str, Any]]:
    """Every edge model the chapters use at this profile, trained if absent, with its zoo metrics."""
    device = resolve_device(cfg.device)
    rows = []
    for exp, configs in edge_configs(cfg).items():
        for c in configs:
            get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
            meta = info(c, cfg.cache_dir)
            rows.append({"edge model": exp, "seed": c.seed, "zoo key": c.key,
                         "epochs": c.epochs, "final train loss": round(meta["metrics"]["train_loss"], 4),
                         "test accuracy": round(meta["metrics"]["test_accuracy"], 4),
                         "‖W − W_init‖ / ‖W_init‖": round(weight_movement(c, cfg.cache_dir), 3)})
    return rows


def weight_movement(c: Any, cache_dir: Any = None) -> float:
    """‖θ − θ_init‖ / ‖θ_init‖ over all conv/linear weights of a trained zoo model: how far training
    moved it from its initialization (rebuilt from the seed, exactly as ``vfnb.train.train`` does)."""
    import torch

    from ..zoo import load_entry
    model, meta = load_entry(c, cache_dir)
    torch.manual_seed(c.seed)
    init = build_model(c.model, **meta["model_kwargs"])
    num = den = 0.0
    for (name, w), w0 in zip(model.named_parameters(), init.parameters()):
        if name.endswith("weight") and w.dim() > 1:
            num += float(((w.detach().cpu() - w0.detach()) ** 2).sum())
            den += float((w0.detach() ** 2).sum())
    return (num / den) ** 0.5


def plot_training(axes: Any, cfg: Config) -> None:
    """Training loss and test accuracy per epoch of every edge model (from the zoo's histories)."""
    from ..plots import style
    with style():
        for exp, configs in edge_configs(cfg).items():
            for c in configs:
                hist = info(c, cfg.cache_dir).get("history") or {}
                if not hist.get("train_loss"):
                    continue
                epochs = range(1, len(hist["train_loss"]) + 1)
                label = f"{exp}, seed {c.seed}"
                line, = axes[0].plot(epochs, hist["train_loss"], label=label, lw=1.2, marker="o", ms=2.5)
                if hist.get("test_acc"):
                    axes[1].plot(epochs, hist["test_acc"], color=line.get_color(), lw=1.2, marker="o", ms=2.5)
        axes[0].set_yscale("log")
        axes[0].set(xlabel="epoch", ylabel="training loss", title="edge models: training loss")
        axes[1].set(xlabel="epoch", ylabel="test accuracy", title="edge models: test accuracy")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:  # one legend for both panels, below them
            axes[0].figure.legend(handles, labels, loc="outside lower center", ncols=3)


def book_architectures(profile: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Every architecture the book's chapters build at ``profile``: (label, chapters, dataset, ``build_model``
    arguments without the data's), read from the chapters' parameters."""
    e = {c: EXPERIMENTS[c][profile] for c in EXPERIMENTS}
    ln, mv, pre, tr, vt = (e["linear_networks"], e["merging_through_vf"], e["preliminaries"], e["training_recipe"],
                           e["vision_transformers"])
    out = [("Linear MLP", "§4, A.1", ln["dataset"], {"name": "mlp", "depth": ln["depth"], "width": ln["width"],
                                                      "activation": "none"}),
           ("Residual linear MLP", "§5.2 (Fig. 3D)", mv["mlp_dataset"],
            {"name": "mlp", "depth": mv["mlp_depth"], "width": mv["mlp_width"], "activation": "none", "residual": True})]
    ccfg = resolve("preliminaries", profile=profile)
    for model, norm in BOOK_ARCHITECTURES:
        label = {"vgg16": "VGG16", "resnet20": "ResNet20"}[model] + ("" if norm == "none" else f"-{norm.upper()}")
        out.append((label, "§2, §5", pre["dataset"], {"name": model, "norm": norm, "width": width_for(ccfg, model)}))
    for arch in tr["lr_archs"]:
        model, norm = {"VGG": (tr["model"], "none"), "VGG-LN": (tr["model"], "ln"), "ResNet20-LN": ("resnet20", "ln")}[arch]
        width = tr["model_width"] * (4.0 if model == "resnet20" else 1.0)
        out.append((f"{model.upper() if model != 'resnet20' else 'ResNet20'}{'' if norm == 'none' else '-LN'}",
                    "A.4", tr["dataset"], {"name": model, "norm": norm, "width": width}))
    out.append(("VGG16-LN (Git Re-Basin's MNIST recipe)", "A.4", tr["rebasin_dataset"],
                {"name": "vgg16", "norm": "ln", "width": tr["rebasin_width"], "init": "uniform"}))
    pr = e["pruning"]
    out.append(("ConvNeXt", "A.7", pr["dataset"], {"name": "convnext", "width": pr["convnext_width"],
                                                          "layer_scale": CONVNEXT_LAYER_SCALE}))
    out.append(("ViT", "A.8.4", vt["dataset"], {"name": "vit", "width": vt["model_width"], "depth": vt["vit_depth"],
                                                 "num_heads": vt["num_heads"], "patch_size": vt["patch_size"]}))
    mt = e["multitask_merging"]
    out.append((f"{mt['model'].upper()} (foundations and experts)", "multi-task", mt["dataset"],
                {"name": mt["model"], "norm": "none", "width": mt["model_width"]}))
    unique: dict[tuple, list] = {}
    for label, where, dataset, kw in out:  # one row per distinct network; a shared one lists every chapter
        key = (dataset, tuple(sorted(kw.items())))
        if key in unique:
            if where not in unique[key][1]:
                unique[key][1] += ", " + where
        else:
            unique[key] = [label, where, dataset, kw]
    return [tuple(v) for v in unique.values()]


def _built(dataset: str, kw: dict[str, Any]):
    import torch

    from ..data import dataset_shape
    channels, side, classes = dataset_shape(dataset)
    kw = dict(kw)
    name = kw.pop("name")
    model = build_model(name, **kw, **data_kwargs(name, channels, side, classes))
    return model, torch.zeros(1, channels, side, side)


def architecture_summary(cfg: Config) -> list[dict[str, Any]]:
    """Per architecture of :func:`book_architectures` at ``cfg.profile``: input, parameters and
    multiply–accumulates per image (``vfnb.flops.layer_table``: torch's FLOP counter, no hand counting)."""
    from ..flops import layer_table
    check_config(cfg, "experimental_setup")
    rows = []
    for label, where, dataset, kw in book_architectures(cfg.profile):
        model, x = _built(dataset, kw)
        layers = layer_table(model, x)
        args = ", ".join(f"{k}={v}" for k, v in kw.items() if k != "name")
        rows.append({"architecture": label, "chapters": where, "input": "×".join(str(s) for s in x.shape[1:]),
                     "build_model": f"{kw['name']}({args})", "parameters": sum(r["params"] for r in layers),
                     "MACs per image": sum(r["MACs"] for r in layers)})
    return rows


def architecture_breakdowns(cfg: Config):
    """Every architecture's per-layer table (paper Tables 12–16): shapes, parameters and multiply–accumulates of
    each layer, one collapsible section per architecture."""
    from ..flops import layer_table
    from ..plots import collapsible, html_table
    check_config(cfg, "experimental_setup")
    sections = []
    for label, where, dataset, kw in book_architectures(cfg.profile):
        model, x = _built(dataset, kw)
        rows = layer_table(model, x)
        total = {"layer": "total", "type": "", "input": "", "output": "", "params": sum(r["params"] for r in rows),
                 "MACs": sum(r["MACs"] for r in rows)}
        sections.append((f"{label} ({where}): {total['params']:,} parameters, {total['MACs']:,} MACs",
                         html_table(rows + [total])))
    return collapsible(sections)


def parameters_table(experiment: str) -> list[dict[str, str]]:
    """One chapter's parameters under each profile, one row per parameter (``vfnb.config.EXPERIMENTS``)."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown chapter id {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    spec = EXPERIMENTS[experiment]
    return [{"parameter": f"`{name}`", **{p: repr(spec[p][name]) for p in PROFILES}} for name in spec["cpu"]]


def parameters_by_chapter() -> Any:
    """Every chapter's parameters under each profile, one closed section per chapter (they open on a click)."""
    from ..plots import collapsible, html_table
    return collapsible([(f"{name} ({len(EXPERIMENTS[name]['cpu'])} parameters)", html_table(parameters_table(name)))
                        for name in EXPERIMENTS])
