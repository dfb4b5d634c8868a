"""Explorers: one precomputed image per grid point, controls jslinked to the stacks."""
from __future__ import annotations

import ipywidgets as W
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from vfnb.widgets import explorer, explorer2d, to_png  # noqa: E402


def _figure(alpha: float, power: int = 1) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, alpha ** power])
    ax.set_title(f"{power} {alpha}")
    return fig


def _link_ends(link: W.Widget) -> tuple[tuple[W.Widget, str], tuple[W.Widget, str]]:
    return tuple(link.source), tuple(link.target)


def test_explorer_one_image_per_value_and_linked_slider() -> None:
    ex = explorer([0.0, 0.25, 0.5, 1.0], _figure, value=0.3, progress=False)
    images = ex.stack.children
    assert len(images) == 4 and all(isinstance(im, W.Image) and bytes(im.value).startswith(b"\x89PNG") for im in images)
    assert len({bytes(im.value) for im in images}) == 4, "every grid point must get its own figure"
    assert ex.slider.options == ("0.00", "0.25", "0.50", "1.00")
    assert ex.slider.index == ex.stack.selected_index == 1  # nearest grid point to 0.3
    assert [_link_ends(link) for link in ex.links] == [((ex.slider, "index"), (ex.stack, "selected_index"))]
    assert type(ex.links[0]).__name__ == "Link" and ex.children == (ex.slider, ex.stack)
    assert plt.get_fignums() == [], "rendered figures must be closed"


def test_explorer_accepts_png_bytes_and_label_functions() -> None:
    png = to_png(_figure(0.5))
    ex = explorer(["a", "b"], lambda v: png, description="method", label_fmt=str.upper, progress=False)
    assert ex.slider.options == ("A", "B") and ex.slider.description == "method"
    assert bytes(ex.stack.children[1].value) == png and ex.stack.selected_index == 0


def test_explorer2d_stack_of_stacks() -> None:
    ex = explorer2d(["wm", "am"], [0.0, 0.5, 1.0], lambda r, a: _figure(a, 1 + (r == "am")), row="am",
                    col=1.0, progress=False)
    slider, dropdown = ex.controls
    assert dropdown.options == ("wm", "am") and dropdown.index == 1 and ex.stack.selected_index == 1
    assert [len(inner.children) for inner in ex.stack.children] == [3, 3]
    assert slider.index == 2 and all(inner.selected_index == 2 for inner in ex.stack.children)
    ends = [_link_ends(link) for link in ex.links]
    assert ((dropdown, "index"), (ex.stack, "selected_index")) in ends
    assert all(((slider, "index"), (inner, "selected_index")) in ends for inner in ex.stack.children)
    assert ex.values[4] == ("am", 0.5)


@pytest.mark.parametrize("values, render, error, message", [
    ([], _figure, ValueError, "values is empty"),
    (0.5, _figure, TypeError, "must be a sequence"),
    ([0.0, 1.0], "not callable", TypeError, "render must be a callable"),
    ([0.0, 1.0], lambda v: 42, TypeError, "matplotlib Figure or PNG bytes, got int"),
    ([0.0, 1.0], lambda v: b"GIF89a", ValueError, "not a PNG"),
    ([0.001, 0.002], _figure, ValueError, "not distinct"),
])
def test_explorer_rejects_bad_input(values: object, render: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        explorer(values, render, progress=False)  # type: ignore[arg-type]
    plt.close("all")


def test_explorer_rejects_value_off_a_non_numeric_grid() -> None:
    with pytest.raises(ValueError, match="not one of the grid values"):
        explorer(["a", "b"], lambda v: _figure(0.5), value="c", progress=False)
    with pytest.raises(ValueError, match="row 'x' is not one of"):
        explorer2d(["a"], [0.0], lambda r, c: _figure(c), row="x", progress=False)
