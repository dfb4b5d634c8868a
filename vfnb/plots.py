"""One figure style for every chapter and the CLI, and the paper's figures as functions."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .diagnose import FeatureBias, LogitStats, VFCurve

#: Colours: merged model, edge models, offsets, rescaled.
COLORS = {"merged": "#c0392b", "edge": "#2c3e50", "edge0": "#2980b9", "edge1": "#27ae60",
          "h": "#8e44ad", "rescaled": "#e67e22"}

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "legend.fontsize": 8, "legend.frameon": False, "lines.linewidth": 1.6, "lines.markersize": 4,
}


@contextmanager
def style() -> Iterator[None]:
    """Apply the vfnb figure style inside a ``with`` block."""
    with plt.rc_context(STYLE):
        yield


class BookFigure(Figure):
    """A matplotlib Figure that notebooks display as a PNG when a cell returns it."""

    def _repr_png_(self) -> bytes:
        import io
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def figure(ncols: int = 1, width: float = 4.0, height: float = 3.0, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    """A styled figure with ``ncols`` axes side by side, and ``nrows`` such rows stacked (the axes are
    always returned as a flat array, row after row; ``width``/``height`` are per axes).

    The figure is not registered with pyplot, so notebooks show it only where a cell returns it
    and nothing accumulates in memory.
    """
    with style():
        fig = BookFigure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _band(ax, x, mean, std, color, label, marker="o", ls="-") -> None:
    ax.plot(x, mean, marker=marker, ls=ls, color=color, label=label)
    ax.fill_between(x, np.maximum(mean - std, 1e-12), mean + std, color=color, alpha=0.15, lw=0)


def plot_feature_bias(ax, merged: FeatureBias, edges: Sequence[FeatureBias], alpha: float = 0.5) -> None:
    """Paper Fig. 1 left: per layer, E‖g‖ (± std over the data) and ‖h‖, merged vs edge average."""
    x = merged.depth
    eg = np.mean([e.g_mean for e in edges], 0)
    es = np.mean([e.g_std for e in edges], 0)
    eh = np.mean([e.h_norm for e in edges], 0)
    with style():
        _band(ax, x, eg, es, COLORS["edge"], "edges: E‖g‖")
        ax.plot(x, eh, "s--", color=COLORS["edge"], alpha=0.7, label="edges: ‖h‖")
        _band(ax, x, merged.g_mean, merged.g_std, COLORS["merged"], f"merged α={alpha:.2f}: E‖g‖")
        ax.plot(x, merged.h_norm, "s--", color=COLORS["merged"], alpha=0.7, label=f"merged α={alpha:.2f}: ‖h‖")
        ax.set_yscale("log")
        ax.set_xlabel("layer l")
        ax.set_ylabel("norm / √d")
        ax.set_xticks(x)
        ax.set_title("input-induced feature g vs offset h")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_weight_scale(ax, merged: dict, edges: Sequence[dict]) -> None:
    """Paper Fig. 1 mid: mean |W| and mean |b| per layer, merged vs each edge model."""
    x = np.arange(1, len(merged["weight"]) + 1)
    with style():
        for i, e in enumerate(edges):
            c = COLORS.get(f"edge{i}", COLORS["edge"])
            ax.plot(x, e["weight"], "o-", color=c, label=f"edge {i}: mean|W|")
            ax.plot(x, e["bias"], "s--", color=c, alpha=0.7, label=f"edge {i}: mean|b|")
        ax.plot(x, merged["weight"], "o-", color=COLORS["merged"], label="merged: mean|W|")
        ax.plot(x, merged["bias"], "s--", color=COLORS["merged"], alpha=0.7, label="merged: mean|b|")
        ax.set_xlabel("layer l")
        ax.set_ylabel("mean absolute value")
        ax.set_xticks(x)
        ax.set_title("parameter scale")
        ax.legend(ncol=1)


def plot_rescaled(ax, merged: FeatureBias, rescaled: np.ndarray, edges: Sequence[FeatureBias]) -> None:
    """Paper Fig. 1 right: E‖g_α‖ before and after rescaling by the weight-scale ratio."""
    x = merged.depth
    with style():
        ax.plot(x, np.mean([e.g_mean for e in edges], 0), "o-", color=COLORS["edge"], label="edges: E‖g‖")
        ax.plot(x, merged.g_mean, "o-", color=COLORS["merged"], label="merged: E‖g‖")
        ax.plot(x, rescaled, "o--", color=COLORS["rescaled"], label="merged, rescaled")
        ax.set_yscale("log")
        ax.set_xlabel("layer l")
        ax.set_ylabel("E‖g‖ / √d")
        ax.set_xticks(x)
        ax.set_title("g rescaled by Π mean|W_edge| / mean|W_α|")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_variance(ax, merged: FeatureBias, edges: Sequence[FeatureBias], alpha: float = 0.5) -> None:
    """Definition 4.1: Var_x[f⁽ˡ⁾(x)] per layer, merged vs edges (variance collapse)."""
    x = merged.depth
    with style():
        for i, e in enumerate(edges):
            ax.plot(x, e.variance, "o-", color=COLORS.get(f"edge{i}", COLORS["edge"]), label=f"edge {i}")
        ax.plot(x, merged.variance, "o-", color=COLORS["merged"], label=f"merged α={alpha:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("layer l")
        ax.set_ylabel("Var_x f⁽ˡ⁾(x)  (mean over units)")
        ax.set_xticks(x)
        ax.set_title("variance collapse")
        ax.legend()


def plot_interpolation(ax, curves: dict[str, dict[str, np.ndarray]], metric: str = "accuracy") -> None:
    """Accuracy (or loss) against α, one line per named curve."""
    with style():
        for i, (name, c) in enumerate(curves.items()):
            ax.plot(c["alpha"], c[metric], "o-", label=name, color=list(COLORS.values())[i % len(COLORS)])
        ax.set_xlabel("α")
        ax.set_ylabel(metric)
        if metric == "accuracy":
            ax.set_ylim(0, 1)
        ax.set_title(f"{metric} along θ_α = (1−α)θ₀ + αθ₁")
        ax.legend()




def plot_vf_curves(ax, curves: dict[str, VFCurve], show_ratio: bool = True, legend: str = "outside",
                   colors: dict[str, str] | None = None) -> None:
    """Paper Fig. 3B: the normalized upper bound ε_l (solid) of each named model's vanishing-feature
    curve against relative depth l/L, with the measured ratio E_l (faint markers). ``legend`` is
    ``"outside"`` (right of the axes) or a matplotlib location such as ``"lower left"``; ``colors`` may
    fix a curve's colour by name (the others follow the palette)."""
    if not curves:
        raise ValueError("plot_vf_curves needs at least one curve")
    palette = list(COLORS.values())
    with style():
        for i, (name, c) in enumerate(curves.items()):
            col = (colors or {}).get(name, palette[i % len(palette)])
            ax.plot(c.relative_depth, c.bound, "-", color=col, label=name)
            if show_ratio:
                ax.plot(c.relative_depth, c.ratio, "o", color=col, alpha=0.35, ms=3)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("relative depth l / L")
        ax.set_ylabel("E‖g_α‖ / mean edge E‖g‖  (bound ε_l)")
        ax.set_title("vanishing feature: upper bound ε_l")
        if legend == "outside":
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(loc=legend)


def plot_logits(ax, stats: dict[str, LogitStats], std_scale: float = 1.0) -> None:
    """Paper Fig. 3A: per class, the mean logit over the data ± ``std_scale``·std (error bars) and the
    logit f(0) of the all-zero input (crosses), one colour per named model."""
    if not stats:
        raise ValueError("plot_logits needs at least one model's LogitStats")
    palette = list(COLORS.values())
    n = len(stats)
    width = 0.8 / n
    with style():
        for i, (name, s) in enumerate(stats.items()):
            col = palette[i % len(palette)]
            x = np.arange(len(s.mean)) + (i - (n - 1) / 2) * width
            lab = f"{name}: mean ± {std_scale:g}·std" if std_scale != 1 else f"{name}: mean ± std"
            ax.errorbar(x, s.mean, yerr=std_scale * s.std, fmt="o", color=col, capsize=2, ms=3, label=lab)
            ax.plot(x, s.zero, "x", color=col, ms=6, mew=1.5, label=f"{name}: f(0)")
        ax.set_xticks(np.arange(len(next(iter(stats.values())).mean)))
        ax.set_xlabel("class")
        ax.set_ylabel("logit")
        ax.set_title("output logits over the data vs f(0)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_bn_stats(ax, before: dict[str, tuple[np.ndarray, np.ndarray]],
                  after: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Paper Fig. 3C: per BatchNorm layer, the channel average of the running std (solid) and of the
    running mean (dashed), before and after RESET. ``ax`` may be one axes or a pair (mean, std)."""
    if list(before) != list(after):
        raise ValueError("before and after must name the same BatchNorm layers (one model before/after RESET)")
    if not before:
        raise ValueError("plot_bn_stats needs at least one BatchNorm layer")
    axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    x = np.arange(1, len(before) + 1)
    with style():
        for what, k, ls in (("running mean", 0, "--"), ("running std", 1, "-")):
            a = axes[k] if len(axes) > 1 else axes[0]
            for label, st, col in (("before RESET", before, COLORS["merged"]), ("after RESET", after, COLORS["edge0"])):
                a.plot(x, [v[k].mean() for v in st.values()], "o" + ls, color=col, label=f"{what}, {label}")
            a.set_xlabel("BatchNorm layer")
            a.set_xticks(x)
            a.set_ylabel("channel average" if len(axes) == 1 else f"{what} (channel average)")
        axes[0].set_title("BatchNorm running statistics" if len(axes) == 1 else "running mean")
        if len(axes) > 1:
            axes[1].set_title("running std")
        for a in axes[:2]:
            a.legend()


def plot_scaling_matrix(axes, rows: Sequence[dict], samples: dict[str, np.ndarray], layer: str = "") -> None:
    """Paper §5.2 "Permutation": the elementwise scaling matrix W0 ⊘ W1 without and with alignment.

    ``axes[0]``: histogram of the entries of W0 ⊘ W1 of one layer within [−3, 3] (all ones would
    mean identical weights). ``axes[1]``: per layer, the fraction of entries with W0·W1 > 0 and the
    midpoint scale ‖(W0+W1)/2‖ / mean‖W_i‖, from ``rows`` with keys ``"sign agreement, <name>"`` and
    ``"midpoint scale, <name>"`` (as :func:`vfnb.diagnose.scaling_matrix` rows).
    """
    if not samples or not rows:
        raise ValueError("plot_scaling_matrix needs ratio samples and per-layer rows")
    palette = [COLORS["merged"], COLORS["edge0"], COLORS["edge1"], COLORS["h"]]
    names = [k.split(", ", 1)[1] for k in rows[0] if k.startswith("sign agreement, ")]
    with style():
        bins = np.linspace(-3, 3, 61)
        for i, (name, r) in enumerate(samples.items()):
            axes[0].hist(r[np.abs(r) <= 3], bins=bins, histtype="step", lw=1.6, color=palette[i % len(palette)],
                         label=f"{name} ({np.mean(r > 0):.0%} > 0)")
        axes[0].axvline(1.0, color="grey", lw=0.8, ls=":")
        axes[0].set_xlabel("entry of W0 ⊘ W1 (entries in [−3, 3])")
        axes[0].set_ylabel("entries")
        axes[0].set_title(f"W0 ⊘ W1{' of ' + layer if layer else ''}")
        axes[0].legend()
        x = np.arange(1, len(rows) + 1)
        for i, name in enumerate(names):
            col = palette[i % len(palette)]
            axes[1].plot(x, [r[f"sign agreement, {name}"] for r in rows], "o-", color=col,
                         label=f"{name}: sign agreement")
            axes[1].plot(x, [r[f"midpoint scale, {name}"] for r in rows], "s--", color=col,
                         label=f"{name}: ‖W_0.5‖ / mean‖W_i‖")
        axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
        axes[1].axhline(2 ** -0.5, color="grey", lw=0.8, ls="-.")
        axes[1].set_xlabel("layer l")
        axes[1].set_xticks(x)
        axes[1].set_ylim(0.4, 1.02)
        axes[1].set_title("per layer (unrelated weights: ½ and 1/√2)")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_layer_sweep(ax, x: Sequence[float], curves: dict[str, Sequence[float]], edge_mean: float | None = None,
                     ensemble: float | None = None, xlabel: str = "layers l", title: str = "",
                     current: float | None = None, colors: dict[str, str] | None = None) -> None:
    """Accuracy against a number of layers (paper Fig. 4 left, PFM over l), one line per named curve,
    with the edge models' average and the ensemble as horizontal references and ``current`` marked.
    Without ``colors``, curves come in pairs (a method, then the method + normalization), one colour
    per pair; with ``colors`` (method name -> colour), a curve named ``"<method> + <fix>"`` takes its
    method's colour, dashed."""
    palette = [COLORS["merged"], COLORS["edge0"], COLORS["rescaled"], COLORS["edge1"], COLORS["h"], COLORS["edge"]]
    with style():
        for i, (name, y) in enumerate(curves.items()):
            if colors is not None:
                base, fixed = name.split(" + ")[0], " + " in name
                ax.plot(x, y, "s--" if fixed else "o-", color=colors.get(base, palette[i % len(palette)]), label=name)
                continue
            ax.plot(x, y, "o-" if i % 2 == 0 else "s--", color=palette[(i // 2) % len(palette)], label=name)
        if edge_mean is not None:
            ax.axhline(edge_mean, color=COLORS["edge"], lw=1, ls=":", label=f"edge average {edge_mean:.3f}")
        if ensemble is not None:
            ax.axhline(ensemble, color=COLORS["h"], lw=1, ls="-.", label=f"ensemble {ensemble:.3f}")
        if current is not None:
            ax.axvline(current, color="grey", lw=3, alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(list(x))
        if title:
            ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_cost_curves(ax, curves: dict[str, tuple[Sequence[float], Sequence[float]]], edge_mean: float | None = None,
                     xlabel: str = "parameters (× one edge model)", title: str = "") -> None:
    """Accuracy against cost: ``curves[name] = (cost ratios, accuracies)`` (PFM vs partial zipping)."""
    palette = [COLORS["merged"], COLORS["rescaled"], COLORS["edge0"], COLORS["edge1"]]
    with style():
        for i, (name, (c, y)) in enumerate(curves.items()):
            ax.plot(c, y, "o-" if i % 2 == 0 else "s--", color=palette[i % len(palette)], label=name)
        if edge_mean is not None:
            ax.axhline(edge_mean, color=COLORS["edge"], lw=1, ls=":", label=f"edge average {edge_mean:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        if title:
            ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def table(rows: Sequence[dict], floatfmt: str = "{:.4g}"):
    """Rows of dicts as a Markdown table, displayed in notebooks and in the built book."""
    from IPython.display import Markdown
    if not rows:
        return Markdown("*(empty)*")
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every key, in order of first appearance
    def fmt(v) -> str:
        text = floatfmt.format(v) if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")  # a bare | would end the cell
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return Markdown("\n".join(lines))


def html_table(rows: Sequence[dict], floatfmt: str = "{:.4g}", raw: Sequence[str] = ()) -> str:
    """Rows of dicts as an HTML table in a horizontally scrolling box; every cell is escaped except the columns
    named in ``raw`` (already HTML, e.g. links)."""
    import html
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(c: str, v: object) -> str:
        text = floatfmt.format(v) if isinstance(v, float) else str(v)
        return text if c in raw else html.escape(text)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(c, r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return (f'<div class="vfnb-table" style="overflow-x:auto"><table class="table">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def collapsible(sections: Sequence[tuple[str, str]]):
    """``(title, html)`` sections as one HTML block of ``<details>`` elements, closed until clicked (they work in
    the static book without a kernel)."""
    import html

    from IPython.display import HTML
    return HTML("".join(f"<details><summary>{html.escape(t)}</summary>{body}</details>" for t, body in sections))
