"""Explorers that also work in the static HTML book, where no kernel runs.

Every figure of the grid is rendered up front into an ``Image`` inside a ``Stack``; the controls
are linked to the stack's ``selected_index`` with :func:`ipywidgets.jslink`, a link that lives in
the browser. The executed notebook embeds the widget state, so moving the slider in the book
switches the figure on the client side.
"""
from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import ipywidgets as W

__all__ = ["Explorer", "explorer", "explorer2d", "to_png"]


def to_png(figure: Any, dpi: int | None = None) -> bytes:
    """PNG bytes of a matplotlib Figure (closed afterwards); PNG bytes pass through.

    The figure keeps its own size (no tight cropping), so every frame of an explorer has the same
    size and the page does not jump while the slider moves; legends that cover data are moved first
    (:func:`vfnb.plots.clear_legends`).
    """
    if isinstance(figure, (bytes, bytearray)):
        data = bytes(figure)
        if not data.startswith(b"\x89PNG"):
            raise ValueError("render returned bytes that are not a PNG image")
        return data
    if not hasattr(figure, "savefig"):
        raise TypeError(f"render must return a matplotlib Figure or PNG bytes, got {type(figure).__name__}")
    import matplotlib.pyplot as plt

    from .plots import clear_legends
    clear_legends(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


class Explorer(W.VBox):
    """Controls above a stack of precomputed figures (a ``VBox``; see :func:`explorer`)."""

    def __init__(self, controls: list[W.Widget], stack: W.Stack, links: list[W.Widget], values: list[Any],
                 **kwargs: Any):
        super().__init__([*controls, stack], **kwargs)
        self.controls, self.stack, self.links, self.values = controls, stack, links, values

    @property
    def slider(self) -> W.Widget:
        """The first control (the α slider)."""
        return self.controls[0]


def _grid(values: Sequence[Any], what: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a sequence of grid values, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError(f"{what} is empty: give at least one grid value")
    return values


def _labels(values: list[Any], fmt: str | Callable[[Any], str], what: str) -> list[str]:
    def one(v: Any) -> str:
        if callable(fmt):
            return str(fmt(v))
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)

    labels = [one(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what} labels {labels} are not distinct: pass a finer label format")
    return labels


def _nearest(values: list[Any], value: Any) -> int:
    if value is None:
        return 0
    if value in values:
        return values.index(value)
    try:
        return min(range(len(values)), key=lambda i: abs(float(values[i]) - float(value)))
    except (TypeError, ValueError):
        raise ValueError(f"value {value!r} is not one of the grid values {values}") from None


def _slider(labels: list[str], index: int, description: str) -> W.SelectionSlider:
    return W.SelectionSlider(options=labels, index=index, description=description, continuous_update=True,
                             layout=W.Layout(width="min(100%, 32rem)"),
                             style={"description_width": "initial"})


def _images(pngs: list[bytes]) -> list[W.Image]:
    return [W.Image(value=png, format="png", layout=W.Layout(max_width="100%", height="auto")) for png in pngs]


def _check_render(render: Any) -> None:
    if not callable(render):
        raise TypeError(f"render must be a callable returning a Figure or PNG bytes, got {type(render).__name__}")


def explorer(values: Sequence[Any], render: Callable[[Any], Any], description: str = "α",
             label_fmt: str | Callable[[Any], str] = "{:.2f}", value: Any = None,
             progress: bool = True) -> Explorer:
    """A slider over ``values`` that switches between figures ``render(v)``, kernel or not.

    ``render`` returns a matplotlib Figure (closed after rendering) or PNG bytes. The slider
    starts at ``value`` (the nearest grid point) or the first value.
    """
    from tqdm.auto import tqdm

    values = _grid(values, "values")
    _check_render(render)
    labels = _labels(values, label_fmt, "values")
    index = _nearest(values, value)
    pngs = [to_png(render(v)) for v in tqdm(values, desc=f"rendering {description}", disable=not progress,
                                            leave=False)]
    stack = W.Stack(_images(pngs), selected_index=index)
    slider = _slider(labels, index, description)
    link = W.jslink((slider, "index"), (stack, "selected_index"))
    return Explorer([slider], stack, [link], values)


def explorer2d(rows: Sequence[Any], cols: Sequence[Any], render: Callable[[Any, Any], Any],
               row_description: str = "method", col_description: str = "α",
               row_fmt: str | Callable[[Any], str] = "{}", col_fmt: str | Callable[[Any], str] = "{:.2f}",
               row: Any = None, col: Any = None, progress: bool = True) -> Explorer:
    """A dropdown over ``rows`` and a slider over ``cols`` switching figures ``render(row, col)``.

    One inner ``Stack`` per row holds the figures over ``cols``; the slider is jslinked to every
    inner stack and the dropdown to the outer one, so both controls work without a kernel.
    """
    from tqdm.auto import tqdm

    rows, cols = _grid(rows, "rows"), _grid(cols, "cols")
    _check_render(render)
    row_labels, col_labels = _labels(rows, row_fmt, "rows"), _labels(cols, col_fmt, "cols")
    if row is not None and row not in rows:
        raise ValueError(f"row {row!r} is not one of {rows}")
    r0 = rows.index(row) if row is not None else 0
    c0 = _nearest(cols, col)
    bar = tqdm(total=len(rows) * len(cols), desc="rendering", disable=not progress, leave=False)
    inner = []
    for r in rows:
        pngs = []
        for c in cols:
            pngs.append(to_png(render(r, c)))
            bar.update()
        inner.append(W.Stack(_images(pngs), selected_index=c0))
    bar.close()
    outer = W.Stack(inner, selected_index=r0)
    slider = _slider(col_labels, c0, col_description)
    dropdown = W.Dropdown(options=row_labels, index=r0, description=row_description,
                          style={"description_width": "initial"})
    links = [W.jslink((dropdown, "index"), (outer, "selected_index"))]
    links += [W.jslink((slider, "index"), (stack, "selected_index")) for stack in inner]
    return Explorer([slider, dropdown], outer, links, [(r, c) for r in rows for c in cols])
