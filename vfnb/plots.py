"""One figure style for every chapter and the CLI, and the paper's figures as functions."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import matplotlib.pyplot as plt
from cycler import cycler
import numpy as np
from matplotlib.figure import Figure

from .diagnose import FeatureBias, LogitStats, VFCurve

#: Colours: merged model, edge models, offsets, rescaled.
COLORS = {"merged": "#c0392b", "edge": "#2c3e50", "edge0": "#2980b9", "edge1": "#27ae60",
          "h": "#8e44ad", "rescaled": "#e67e22"}

#: One colour per method, the same in every chapter (:func:`color` looks names up, with their usual
#: abbreviations). Curves that are not methods (edge models, tasks, seeds) use :data:`CYCLE`.
METHOD_COLORS = {
    # no alignment, no fix
    "direct": "#7f8c8d",
    # alignments
    "weight matching": "#1f77b4", "activation matching": "#2ca02c", "ZipIt!": "#bcbd22",
    "OT fusion": "#8c564b", "CCA": "#17a589",
    # post-merging (and post-pruning) fixes
    "REPAIR": "#d62728", "RESCALE": "#9467bd", "RESET": "#17becf", "bias removal": "#e377c2",
    "bias calibration": "#ff7f0e",
    # beyond
    "PFM": "#0e6655", "TACT": "#e7ba52", "TALL masks": "#7b4173",
    # pruners
    "global magnitude": "#393b79", "layerwise magnitude": "#6b6ecf", "Wanda": "#637939",
    "diagonal Fisher": "#843c39",
}
#: A BatchNorm model before RESET (no normalization: grey) and after it (RESET's colour), in every panel.
BEFORE_AFTER_RESET = {"before RESET": METHOD_COLORS["direct"], "after RESET": METHOD_COLORS["RESET"]}
#: Other names of the methods above.
METHOD_ALIASES = {"no normalization": "direct", "direct merging": "direct", "plain": "direct", "none": "direct",
                  "wm": "weight matching", "am": "activation matching", "zipit": "ZipIt!", "ot": "OT fusion",
                  "ot fusion (activations)": "OT fusion", "magnitude": "global magnitude", "fisher": "diagonal Fisher",
                  "preserve-first merging": "PFM", "partial zip": "ZipIt!",
                  "partial zipping": "ZipIt!"}
#: Line colours for curves that are not methods: 20 distinguishable colours (matplotlib's tab10, then its
#: light shades), so a figure with up to 20 lines never repeats one.
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
         "#dbdb8d", "#9edae5")

#: Width of the book's text column at a 1280-px window, in pixels, and the resolution figures are
#: saved at: a figure at most ``COLUMN_PX / DPI`` inches wide is shown at its natural size, so its
#: 8-9 pt text stays 8-9 pt on screen.
COLUMN_PX = 670
DPI = 100
COLUMN_IN = COLUMN_PX / DPI
#: The narrowest axes :func:`figure` makes when it shrinks panels to fit the column; narrower panels
#: are stacked instead.
MIN_AXES_IN = 2.6

STYLE = {
    "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "legend.fontsize": 8, "legend.frameon": False, "lines.linewidth": 1.6, "lines.markersize": 4,
    "axes.prop_cycle": cycler(color=CYCLE),
}


def color(name: str, fallback: int = 0) -> str:
    """The colour of a method in every figure of the book (:data:`METHOD_COLORS`).

    Case and abbreviations do not matter (``"WM"``, ``"weight matching"``); a leading ``"+ "`` is dropped.
    A combination ``"<method> + <fix>"`` takes its first method's colour (figures draw the fix dashed), a
    label of comma-separated parts (``"plain, weight matching"``) its last method's, and a label that starts
    with a method (``"REPAIR (weight matching)"``) that method's. Anything else takes ``CYCLE[fallback]``."""
    lower = {k.lower(): k for k in METHOD_COLORS}

    def lookup(text: str) -> str | None:
        key = text.strip().removeprefix("+").strip().lower()
        key = METHOD_ALIASES.get(key, lower.get(key, key)).lower()
        return METHOD_COLORS[lower[key]] if key in lower else None

    first = name.split(" + ")[0] if " + " in name.strip().removeprefix("+") else name
    found = lookup(first)
    for part in reversed(first.split(",")) if found is None and "," in first else ():  # "plain, weight matching"
        found = found or lookup(part)
    if found is None:
        words = first.strip().removeprefix("+").strip().lower()
        starts = [k for k in (*lower, *METHOD_ALIASES) if words.startswith(k + " ") or words.startswith(k + ",")]
        found = lookup(max(starts, key=len)) if starts else None
    return found or CYCLE[fallback % len(CYCLE)]


def is_fixed(name: str) -> bool:
    """Whether a curve's name is ``"<method> + <fix>"`` (drawn dashed in the method's colour)."""
    return " + " in name.strip().removeprefix("+")


#: Line style of a ``"<method> + <fix>"`` curve, by fix, so that WM + REPAIR and WM + RESCALE differ.
FIX_LINESTYLES = {"REPAIR": "--", "RESCALE": ":", "RESET": "-.", "TACT": (0, (5, 1, 1, 1, 1, 1))}


_SPARE_DASHES = ((0, (6, 2)), (0, (1, 1.5)), (0, (6, 2, 1.5, 2)), (0, (3, 3)), (0, (8, 2, 1, 2, 1, 2)))


def distinct_style(used: set, col: str, style: dict) -> dict:
    """``style`` for a curve of colour ``col``, with another dash pattern if a curve of the same colour and
    style is already drawn (two settings of one method, e.g. plain and residual weight matching); ``used``
    collects what is drawn."""
    key = (col, str(style["linestyle"]))
    if key in used:
        for dash in _SPARE_DASHES:
            if (col, str(dash)) not in used:
                style, key = {**style, "linestyle": dash, "marker": "^"}, (col, str(dash))
                break
    used.add(key)
    return style


def line_style(name: str) -> dict:
    """``marker`` and ``linestyle`` of a named curve: solid with dots for a method, and for
    ``"<method> + <fix>"`` squares in the fix's dash pattern (:data:`FIX_LINESTYLES`; other fixes dashed)."""
    if not is_fixed(name):
        return {"marker": "o", "linestyle": "-"}
    fix = name.strip().removeprefix("+").split(" + ", 1)[1].strip()
    key = next((k for k in FIX_LINESTYLES if fix.lower().startswith(k.lower())), None)
    return {"marker": "s", "linestyle": FIX_LINESTYLES[key] if key else (0, (6, 2))}


@contextmanager
def style() -> Iterator[None]:
    """Apply the vfnb figure style inside a ``with`` block."""
    with plt.rc_context(STYLE):
        yield


def _data_points(ax) -> tuple[np.ndarray, list]:
    """Display coordinates of what ``ax`` draws (line vertices and points along segments, markers, bar
    corners), and the filled paths (bands), for :func:`clear_legends`."""
    from matplotlib.collections import LineCollection, PathCollection, PolyCollection
    points, areas = [np.empty((0, 2))], []

    def along(xy: np.ndarray) -> np.ndarray:
        if len(xy) < 2:
            return xy
        t = np.linspace(0.0, 1.0, 16)[:, None, None]
        return (xy[:-1][None] * (1 - t) + xy[1:][None] * t).reshape(-1, 2)

    for line in ax.get_lines():
        if not line.get_visible():
            continue
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), float))
        joined = line.get_linestyle() not in ("None", "none", "", " ")
        points.append(along(xy) if joined else xy)
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        if isinstance(coll, PathCollection) and len(coll.get_offsets()):  # scatter markers
            points.append(coll.get_offset_transform().transform(np.asarray(coll.get_offsets(), float)))
        elif isinstance(coll, (LineCollection, PolyCollection)):
            for path in coll.get_paths():
                xy = coll.get_transform().transform(path.vertices)
                points.append(along(xy) if isinstance(coll, LineCollection) else xy)
                if isinstance(coll, PolyCollection):
                    areas.append(path.transformed(coll.get_transform()))
    for patch in ax.patches:  # bars
        if patch.get_visible():
            b = patch.get_window_extent()
            points.append(np.array([[b.x0, b.y0], [b.x1, b.y1], [b.x0, b.y1], [b.x1, b.y0],
                                    [(b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2]]))
    xy = np.concatenate(points)
    return xy[np.isfinite(xy).all(1)], areas


def _covers(box, points: np.ndarray, areas: list) -> bool:
    inside = ((points[:, 0] >= box.x0 - 2) & (points[:, 0] <= box.x1 + 2)
              & (points[:, 1] >= box.y0 - 2) & (points[:, 1] <= box.y1 + 2))
    if inside.any():
        return True
    corners = [(box.x0, box.y0), (box.x1, box.y1), (box.x0, box.y1), (box.x1, box.y0),
               ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)]
    return any(a.contains_point(c) for a in areas for c in corners)


_INSIDE = ("upper right", "upper left", "lower left", "lower right", "center right", "center left",
           "upper center", "lower center")


def legend_covers_data(ax) -> bool:
    """Whether the legend of ``ax`` lies over anything the axes draws."""
    leg = ax.get_legend()
    if leg is None or not leg.get_visible():
        return False
    points, areas = _data_points(ax)
    return _covers(leg.get_window_extent(), points, areas)


def _below(ax, leg) -> None:
    """Put ``leg`` under ``ax`` (in two columns when that fits the axes); :func:`_settle` anchors it."""
    leg.set_loc("upper center")
    leg._ncols = 2 if len(leg.get_texts()) >= 2 else 1  # noqa: SLF001 - matplotlib has no setter for ncols
    leg.set_bbox_to_anchor((0.5, -0.15), transform=ax.transAxes)


def _settle(fig: Figure, below: list) -> None:
    """Anchor every legend of ``below`` (pairs of axes and legend) just under its axes' tick labels and x
    label. The anchors are in axes coordinates, and the constrained layout shrinks the axes to make room,
    so they are settled over a few layout passes."""
    anchors: dict[int, float] = {}
    for _ in range(5):
        fig.draw_without_rendering()
        changed = False
        for ax, leg in below:
            box = ax.get_window_extent()
            if leg._ncols > 1 and leg.get_window_extent().width > 1.1 * box.width:  # noqa: SLF001
                leg._ncols, changed = 1, True  # noqa: SLF001
            axis = ax.xaxis.get_tightbbox()
            bottom = min(axis.y0, box.y0) if axis is not None else box.y0
            y = (bottom - box.y0 - 3) / max(box.height, 1.0)
            if abs(y - anchors.get(id(leg), 1.0)) * box.height >= 1:
                anchors[id(leg)], changed = y, True
                leg.set_bbox_to_anchor((0.5, y), transform=ax.transAxes)
        if not changed:
            return


def _wrap_title(ax) -> bool:
    """Break an axes title that is wider than its axes onto two lines; whether it did."""
    import textwrap
    title = ax.title
    text = title.get_text()
    if not text or "\n" in text:
        return False
    width, room = title.get_window_extent().width, ax.get_window_extent().width
    if width <= room:
        return False
    title.set_text("\n".join(textwrap.wrap(text, max(12, int(len(text) * room / width * 0.95)))))
    return True


def _restyle(fig: Figure) -> None:
    """Give text drawn outside :func:`style` (at matplotlib's default sizes: titles 12 pt, labels, ticks and
    legends 10 pt) the book's sizes; text given its own size keeps it."""
    for ax in fig.axes:
        for title in (ax.title, ax._left_title, ax._right_title):  # noqa: SLF001 - the three title slots
            if title.get_fontsize() == 12.0:
                title.set_fontsize(STYLE["axes.titlesize"])
        for label in (ax.xaxis.label, ax.yaxis.label):
            if label.get_fontsize() == 10.0:
                label.set_fontsize(STYLE["axes.labelsize"])
        for tick in (*ax.get_xticklabels(), *ax.get_yticklabels()):
            if tick.get_fontsize() == 10.0:
                ax.tick_params(labelsize=STYLE["font.size"])
                break
        leg = ax.get_legend()
        if leg is not None:
            for text in leg.get_texts():
                if text.get_fontsize() == 10.0:
                    text.set_fontsize(STYLE["legend.fontsize"])
            if leg.get_title().get_fontsize() == 10.0:
                leg.get_title().set_fontsize(STYLE["legend.fontsize"])


def clear_legends(fig: Figure) -> list[str]:
    """Lay a figure out for the book's column; return what changed (for tests). Called on every figure the
    book shows (:class:`BookFigure`, :func:`vfnb.widgets.to_png`).

    - Text drawn outside :func:`style` gets the book's font sizes.
    - A legend beside its axes (outside, on the right) that would squeeze a panel sharing its row, or that
      is wider than a third of its axes, goes under the axes instead.
    - A legend inside the axes that covers data (lines, markers, bars, bands) moves to the first free
      corner or edge, else under the axes; one that fills more than a third of its axes goes under it.
    - A title wider than its axes is broken onto two lines.
    """
    moved: list[str] = []
    below: list = []
    if not fig.axes:
        return moved
    _restyle(fig)
    fig.draw_without_rendering()
    shared_rows = len(fig.axes) > 1 and any(
        abs(a.get_position().y0 - b.get_position().y0) < 1e-3 for a in fig.axes for b in fig.axes if a is not b)
    for ax in fig.axes:
        leg = ax.get_legend()
        name = ax.get_title() or "axes"
        if leg is not None and leg.get_visible():
            lb, axb = leg.get_window_extent(), ax.get_window_extent()
            beside = lb.x0 >= axb.x1 - 2
            if beside and (shared_rows or lb.width > axb.width / 3):
                _below(ax, leg)
                below.append((ax, leg))
                moved.append(f"{name}: below")
            elif not beside and lb.width * lb.height > 0.35 * axb.width * axb.height:  # fills the panel
                _below(ax, leg)
                below.append((ax, leg))
                moved.append(f"{name}: below (too large inside)")
            elif not beside and legend_covers_data(ax):
                points, areas = _data_points(ax)
                for loc in _INSIDE:
                    leg.set_bbox_to_anchor(None)
                    leg.set_loc(loc)
                    fig.draw_without_rendering()
                    if not _covers(leg.get_window_extent(), points, areas):
                        moved.append(f"{name}: {loc}")
                        break
                else:
                    _below(ax, leg)
                    below.append((ax, leg))
                    moved.append(f"{name}: below")
    if below:  # the figure grows by the tallest legend, so the panels keep their height
        tallest = max(leg.get_window_extent().height for _, leg in below) / fig.dpi
        fig.set_figheight(fig.get_figheight() + tallest)
        _settle(fig, below)
    wrapped = [ax for ax in fig.axes if _wrap_title(ax)]  # measured once the legends have their place
    moved += [f"{ax.get_title()}: title wrapped" for ax in wrapped]
    if wrapped and below:
        _settle(fig, below)
    return moved


class BookFigure(Figure):
    """A matplotlib Figure that notebooks display as a PNG when a cell returns it (legends moved off the
    data first, :func:`clear_legends`)."""

    def _repr_png_(self) -> bytes:
        import io
        clear_legends(self)
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.05, dpi=DPI)
        return buf.getvalue()


def fit_column(ncols: int, width: float, height: float, n: int) -> tuple[int, float, float]:
    """Columns, width and height per axes for ``n`` axes asked ``ncols`` across at ``width`` × ``height``
    inches, so the figure fits the book's column (:data:`COLUMN_IN`): panels shrink (keeping their aspect)
    down to :data:`MIN_AXES_IN`, and below that they are stacked (two across when ``n`` is even, else one)."""
    if ncols * width <= COLUMN_IN:
        return ncols, width, height
    cols, w = ncols, COLUMN_IN / ncols
    if w < MIN_AXES_IN:
        cols = 2 if n % 2 == 0 and COLUMN_IN / 2 >= MIN_AXES_IN else 1
        w = COLUMN_IN / cols
    h = height * min(1.0, max(w / width, 0.75))
    return cols, w, h


def figure(ncols: int = 1, width: float = 4.0, height: float = 3.0, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    """A styled figure with ``ncols`` axes side by side, and ``nrows`` such rows stacked (the axes are
    always returned as a flat array, row after row; ``width``/``height`` are per axes, in inches).

    The figure always fits the book's column (:func:`fit_column`): wider requests get narrower panels,
    or panels stacked in more rows, in the same order. It is not registered with pyplot, so notebooks
    show it only where a cell returns it and nothing accumulates in memory.
    """
    n = ncols * nrows
    cols, w, h = fit_column(ncols, width, height, n)
    rows = -(-n // cols)
    with style():
        fig = BookFigure(figsize=(w * cols, h * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


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
        used: set = set()
        for i, (name, c) in enumerate(curves.items()):
            col = color(name, i)
            ax.plot(c["alpha"], c[metric], label=name, color=col, **distinct_style(used, col, line_style(name)))
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
    fix a curve's colour by name (the others take their method's, :func:`color`)."""
    if not curves:
        raise ValueError("plot_vf_curves needs at least one curve")
    with style():
        used: set = set()
        for i, (name, c) in enumerate(curves.items()):
            col = (colors or {}).get(name) or color(name, i)
            ls = distinct_style(used, col, {**line_style(name), "marker": None})["linestyle"]
            ax.plot(c.relative_depth, c.bound, color=col, label=name, linestyle=ls)
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
    n = len(stats)
    width = 0.8 / n
    with style():
        for i, (name, s) in enumerate(stats.items()):
            col = color(name, i)
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
            for label, st in (("before RESET", before), ("after RESET", after)):
                col = BEFORE_AFTER_RESET[label]
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
    names = [k.split(", ", 1)[1] for k in rows[0] if k.startswith("sign agreement, ")]
    with style():
        bins = np.linspace(-3, 3, 61)
        for i, (name, r) in enumerate(samples.items()):
            axes[0].hist(r[np.abs(r) <= 3], bins=bins, histtype="step", lw=1.6, color=color(name, i),
                         label=f"{name} ({np.mean(r > 0):.0%} > 0)")
        axes[0].axvline(1.0, color="grey", lw=0.8, ls=":")
        axes[0].set_xlabel("entry of W0 ⊘ W1 (entries in [−3, 3])")
        axes[0].set_ylabel("entries")
        axes[0].set_title(f"W0 ⊘ W1{' of ' + layer if layer else ''}")
        axes[0].legend()
        x = np.arange(1, len(rows) + 1)
        for i, name in enumerate(names):
            col = color(name, i)
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
    Every curve takes its method's colour (:func:`color`, or ``colors[method]``); a curve named
    ``"<method> + <fix>"`` is drawn dashed in its method's colour."""
    with style():
        used: set = set()
        for i, (name, y) in enumerate(curves.items()):
            base = name.split(" + ")[0]
            col = (colors or {}).get(base) or color(name, i)
            ax.plot(x, y, color=col, label=name, **distinct_style(used, col, line_style(name)))
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
    with style():
        used: set = set()
        for i, (name, (c, y)) in enumerate(curves.items()):
            col = color(name, i)
            ax.plot(c, y, color=col, label=name, **distinct_style(used, col, line_style(name)))
        if edge_mean is not None:
            ax.axhline(edge_mean, color=COLORS["edge"], lw=1, ls=":", label=f"edge average {edge_mean:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        if title:
            ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _column_format(values: Sequence[object]) -> Callable[[object], str]:
    """One number format for a whole column, so 0.1 and 0.9705 print as 0.1000 and 0.9705.

    Floats get the decimals that show the column's largest magnitude to 4 significant digits (and its
    smallest nonzero one to at least 2); a column spanning more than 4 orders of magnitude, or beyond
    [1e-3, 1e5), uses 3 significant digits instead. Integers, strings and ``None`` print as they are."""
    import math
    floats = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    nonzero = [v for v in floats if v > 0]
    if not nonzero:
        return lambda v: (f"{v:g}" if isinstance(v, float) else str(v))
    lo, hi = min(nonzero), max(nonzero)
    if lo < 1e-3 or hi >= 1e5 or hi / lo > 1e4:
        return lambda v: (f"{v:.3g}" if isinstance(v, float) else str(v))
    digits = max(3 - math.floor(math.log10(hi)), 1 - math.floor(math.log10(lo)), 0)
    return lambda v: (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


class Table:
    """Rows of dicts displayed as an escaped HTML table in a horizontally scrolling box (notebooks and the
    built book), and as aligned text in a terminal. Built by :func:`table`."""

    def __init__(self, rows: Sequence[dict], floatfmt: str | None = None, raw: Sequence[str] = ()) -> None:
        self.rows = [dict(r) for r in rows]
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r))  # every key, in order of first appearance
        self.raw = tuple(raw)
        if floatfmt is not None:
            fixed = lambda v: floatfmt.format(v) if isinstance(v, float) else str(v)  # noqa: E731
            self._formats = {c: fixed for c in self.columns}
        else:
            self._formats = {c: _column_format([r.get(c) for r in self.rows]) for c in self.columns}

    def cells(self) -> list[list[str]]:
        """The formatted cells, row by row (missing entries are empty)."""
        return [["" if c not in r or r[c] is None else self._formats[c](r[c]) for c in self.columns]
                for r in self.rows]

    @staticmethod
    def _inline(text: str) -> str:
        """Escaped text with Markdown's inline **bold** and `code` (the only markup cells use)."""
        import html
        import re
        out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p><em>(empty)</em></p>"
        esc = [i for i, c in enumerate(self.columns) if c not in self.raw]
        head = "".join(f"<th>{self._inline(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{self._inline(v) if i in esc else v}</td>" for i, v in enumerate(row))
                       + "</tr>" for row in self.cells())
        hint = (f'<p class="vfnb-scroll-hint">{len(self.columns)} columns: scroll the table sideways to see them '
                "all.</p>" if self.estimated_width() > COLUMN_PX else "")
        return (f'<div class="vfnb-table" style="overflow-x:auto;max-width:100%">'
                f'<table class="table vfnb"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{hint}')

    def estimated_width(self) -> float:
        """A rough width of the rendered table in pixels (7 px per character at the book's table font, the
        longest word of a header since headers wrap, 16 px of padding per column)."""
        cells = self.cells()
        width = 0.0
        for i, c in enumerate(self.columns):
            longest = max([len(w) for w in c.split()] + [len(row[i]) for row in cells] + [1])
            width += 7 * longest + 16
        return width

    def __repr__(self) -> str:
        if not self.rows:
            return "(empty)"
        grid = [self.columns, *self.cells()]
        widths = [max(len(r[i]) for r in grid) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in grid)


def table(rows: Sequence[dict], floatfmt: str | None = None, raw: Sequence[str] = ()) -> Table:
    """Rows of dicts as a :class:`Table`: escaped HTML that scrolls sideways when wider than the column.

    Every cell and header is HTML-escaped (keeping Markdown's inline ``**bold**`` and backquoted code), except
    the columns named in ``raw`` (already HTML, e.g. links).
    Numbers are formatted per column (:func:`_column_format`) unless ``floatfmt`` (e.g. ``"{:.3f}"``) is given.
    """
    return Table(rows, floatfmt, raw)


def html_table(rows: Sequence[dict], floatfmt: str | None = None, raw: Sequence[str] = ()) -> str:
    """The HTML of :func:`table` (for pages that compose it with other HTML)."""
    return Table(rows, floatfmt, raw)._repr_html_()


def collapsible(sections: Sequence[tuple[str, str]]):
    """``(title, html)`` sections as one HTML block of ``<details>`` elements, closed until clicked (they work in
    the static book without a kernel)."""
    import html

    from IPython.display import HTML
    return HTML("".join(f"<details><summary>{html.escape(t)}</summary>{body}</details>" for t, body in sections))
