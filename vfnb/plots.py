"""One figure style for every chapter and the CLI, and the paper's figures as functions."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .diagnose import FeatureBias

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


def figure(ncols: int = 1, width: float = 4.0, height: float = 3.0) -> tuple[Figure, np.ndarray]:
    """A styled figure with ``ncols`` axes side by side (always returned as an array).

    The figure is not registered with pyplot, so notebooks show it only where a cell returns it
    and nothing accumulates in memory.
    """
    with style():
        fig = BookFigure(figsize=(width * ncols, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)
    return fig, axes[0]


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




def table(rows: Sequence[dict], floatfmt: str = "{:.4g}"):
    """Rows of dicts as a Markdown table, displayed in notebooks and in the built book."""
    from IPython.display import Markdown
    if not rows:
        return Markdown("*(empty)*")
    cols = list(rows[0])
    def fmt(v) -> str:
        text = floatfmt.format(v) if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")  # a bare | would end the cell
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return Markdown("\n".join(lines))
