"""vfnb.plots as the book shows it: escaped tables, figures that fit the column, legends off the data,
and one colour per method."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from vfnb import plots


def _png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])


# --------------------------------------------------------------------------- tables
def test_table_escapes_headers_and_cells_and_scrolls() -> None:
    html = plots.table([{"max |f(x) − f_π(x)|": 1e-7, "note": "a<b & `code` **bold**"}])._repr_html_()
    assert "<th>max |f(x) − f_π(x)|</th>" in html  # a | in a header no longer breaks the table
    assert "a&lt;b &amp; <code>code</code> <strong>bold</strong>" in html
    assert 'class="vfnb-table" style="overflow-x:auto' in html and html.count("<tr>") == 2


def test_table_formats_each_column_one_way() -> None:
    t = plots.table([{"acc": 0.1, "n": 3, "tiny": 1e-6, "x": 123.4}, {"acc": 0.9705, "n": 12, "tiny": 0.5, "x": 0.5}])
    assert [r[0] for r in t.cells()] == ["0.1000", "0.9705"]
    assert [r[1] for r in t.cells()] == ["3", "12"]
    assert [r[2] for r in t.cells()] == ["1e-06", "0.5"]  # six orders of magnitude: significant digits
    assert [r[3] for r in t.cells()] == ["123.40", "0.50"]
    assert plots.table([{"a": 0.123456}], floatfmt="{:.2f}").cells() == [["0.12"]]


def test_table_raw_columns_missing_cells_and_text_form() -> None:
    t = plots.table([{"link": '<a href="x.html">x</a>', "v": 1.5}, {"v": 2.0}], raw=("link",))
    html = t._repr_html_()
    assert '<td><a href="x.html">x</a></td>' in html and "<td></td>" in html
    assert repr(t).splitlines()[0].split() == ["link", "v"]
    assert plots.table([])._repr_html_() == "<p><em>(empty)</em></p>"


# --------------------------------------------------------------------------- figures
@pytest.mark.parametrize("ncols,width,nrows", [(1, 7.5, 1), (2, 4.6, 1), (3, 3.9, 1), (3, 2.2, 1), (2, 3.2, 2),
                                               (4, 3.0, 1), (1, 4.0, 1)])
def test_figures_fit_the_column_and_keep_axes_order(ncols: int, width: float, nrows: int) -> None:
    fig, axes = plots.figure(ncols, width=width, height=3.0, nrows=nrows)
    assert len(axes) == ncols * nrows == len(fig.axes)
    assert fig.get_size_inches()[0] <= plots.COLUMN_IN + 1e-9
    if ncols * width <= plots.COLUMN_IN:  # what fits is left as asked
        assert fig.get_size_inches()[0] == pytest.approx(ncols * width)
    for i, ax in enumerate(axes):
        ax.plot([0, 1], [i, i + 1], label=f"curve {i}")
        ax.set_title(f"panel {i}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.draw_without_rendering()
    where = [(-round(ax.get_position().y0, 3), round(ax.get_position().x0, 3)) for ax in axes]
    assert where == sorted(where), "axes are not returned row after row, left to right"
    w, _ = _png_size(fig._repr_png_())
    assert w <= 688, f"{w} px is wider than the book's column"  # shown at its natural size


def test_legend_over_data_is_moved_off_it() -> None:
    fig, (ax,) = plots.figure(width=4.0, height=3.0)
    x = np.linspace(0, 1, 60)
    ax.plot(x, 0.5 + 0 * x, label="flat")
    ax.plot(x, x, label="rising")
    ax.plot(x, 1 - x, label="falling")
    ax.legend(loc="center")
    fig.draw_without_rendering()
    assert plots.legend_covers_data(ax)
    assert plots.clear_legends(fig)
    assert not plots.legend_covers_data(ax)


def test_legend_over_a_band_or_bars_counts_as_covering() -> None:
    fig, axes = plots.figure(2, width=3.0, height=3.0)
    axes[0].fill_between([0, 1], [0, 0], [1, 1], label="band")
    axes[1].bar([0, 1, 2], [1, 1, 1], width=1.0, label="bars")
    for ax in axes:
        ax.legend(loc="center")
    fig.draw_without_rendering()
    assert all(plots.legend_covers_data(ax) for ax in axes)
    plots.clear_legends(fig)
    assert not any(plots.legend_covers_data(ax) for ax in axes)


def test_a_legend_clear_of_data_stays_where_it_is() -> None:
    fig, (ax,) = plots.figure(width=4.0, height=3.0)
    ax.plot([0, 1], [0, 0.1], label="low")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    assert plots.clear_legends(fig) == []
    assert ax.get_legend()._loc == 1  # upper right


def test_explorer_frames_get_their_legends_cleared() -> None:
    from vfnb import widgets
    fig, (ax,) = plots.figure(width=4.0, height=3.0)
    x = np.linspace(0, 1, 40)
    ax.plot(x, 0.5 + 0 * x, label="flat")
    ax.legend(loc="center")
    widgets.to_png(fig)
    assert not plots.legend_covers_data(ax)


# --------------------------------------------------------------------------- colours
def test_one_colour_per_method_whatever_its_name() -> None:
    assert len(set(plots.METHOD_COLORS.values())) == len(plots.METHOD_COLORS)  # no two methods share one
    assert plots.color("WM") == plots.color("weight matching") == plots.color("Weight matching")
    assert plots.color("AM + REPAIR") == plots.color("activation matching") and plots.is_fixed("AM + REPAIR")
    assert plots.color("+ REPAIR") == plots.color("REPAIR") and not plots.is_fixed("+ REPAIR")
    assert plots.color("no normalization") == plots.color("Direct") == plots.color("direct merging")
    assert plots.color("REPAIR (weight matching)") == plots.color("REPAIR")
    assert plots.color("PFM (first n unmerged)") == plots.color("PFM")
    assert plots.color("partial zip (last n unmerged)") == plots.color("ZipIt!")
    assert plots.color("edge 0", 2) == plots.CYCLE[2]


def test_fixes_differ_by_line_style_within_a_method_colour() -> None:
    wm, rep, res = (plots.line_style(n) for n in ("WM", "WM + REPAIR", "WM + RESCALE"))
    assert wm["linestyle"] == "-" and len({str(wm), str(rep), str(res)}) == 3
    assert plots.line_style("AM + RESET")["linestyle"] == "-."


def test_no_two_curves_share_colour_and_style() -> None:
    curves = {n: {"alpha": np.array([0.0, 1.0]), "accuracy": np.array([0.5, 0.5])}
              for n in ("plain, direct", "plain, weight matching", "residual, direct", "residual, weight matching")}
    fig, (ax,) = plots.figure(width=4.0, height=3.0)
    plots.plot_interpolation(ax, curves)
    drawn = [(line.get_color(), str(line.get_linestyle())) for line in ax.get_lines()]
    assert len(set(drawn)) == 4
    assert drawn[0][0] == drawn[2][0] == plots.color("direct")  # a method keeps its colour
    assert drawn[1][0] == drawn[3][0] == plots.color("weight matching")


def test_a_table_wider_than_the_column_says_it_scrolls() -> None:
    narrow = plots.table([{"a": 1.0, "b": 2.0}])
    wide = plots.table([{f"column number {i}": "a long cell value" for i in range(12)}])
    assert narrow.estimated_width() < plots.COLUMN_PX and "vfnb-scroll-hint" not in narrow._repr_html_()
    assert wide.estimated_width() > plots.COLUMN_PX and "12 columns: scroll" in wide._repr_html_()


def test_text_drawn_outside_the_style_gets_the_book_sizes() -> None:
    import matplotlib.pyplot as plt
    fig, (ax,) = plots.figure(width=4.0, height=3.0)
    with plt.rc_context(plt.rcParamsDefault):  # as a chapter function that forgot plots.style()
        ax.plot([0, 1], [0, 1], label="curve")
        ax.set_title("title")
        ax.set_xlabel("x")
        ax.legend(loc="lower right")
        ax.set_ylabel("y", fontsize=11)  # its own size: kept
    plots.clear_legends(fig)
    assert ax.title.get_fontsize() == plots.STYLE["axes.titlesize"] and ax.xaxis.label.get_fontsize() == 9
    assert ax.get_legend().get_texts()[0].get_fontsize() == 8 and ax.yaxis.label.get_fontsize() == 11
