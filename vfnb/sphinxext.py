"""A small Sphinx extension for the built book: the book's stylesheet, and no Thebe.

``_config.yml`` loads it (``sphinx: extra_extensions``). Jupyter Book 1 always loads sphinx-thebe, which
declares its ``THEBE_JS_URL`` constant twice per page (a JavaScript error on every page) and would
fetch Thebe from unpkg; the book runs no kernel, so the pages get neither script.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent / "book_static"
CSS = "vfnb.css"


def _drop_thebe(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Remove sphinx-thebe's scripts and stylesheet from a page."""
    def thebe(asset: Any) -> bool:
        text = " ".join(str(v) for v in (getattr(asset, "filename", asset), *getattr(asset, "attributes", {}).values()))
        return "thebe" in text.lower()
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [a for a in context[key] if not thebe(a)]


def setup(app: Any) -> dict:
    app.config.html_static_path.append(str(STATIC))
    app.add_css_file(CSS)
    app.connect("html-page-context", _drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
