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


#: What sphinx-thebe adds to a page: its script and stylesheet, Thebe itself from unpkg, and an inline script
#: that declares ``THEBE_JS_URL``. Matched exactly: widget state scripts hold base64 images, where any
#: short string such as "thebe" turns up by chance.
THEBE_FILES = ("sphinx-thebe.js", "sphinx-thebe.css")


def _is_thebe(asset: Any) -> bool:
    filename = str(getattr(asset, "filename", asset) or "")
    body = str(getattr(asset, "attributes", {}).get("body", ""))
    return (filename.rsplit("/", 1)[-1].split("?")[0] in THEBE_FILES or "unpkg.com/thebe@" in filename
            or body.lstrip().startswith("const THEBE_JS_URL"))


def _drop_thebe(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Remove sphinx-thebe's scripts and stylesheet from a page."""
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [a for a in context[key] if not _is_thebe(a)]


def setup(app: Any) -> dict:
    """Sphinx's entry point: serve ``book_static/``, add the stylesheet, drop Thebe from every page."""
    app.config.html_static_path.append(str(STATIC))
    app.add_css_file(CSS)
    app.connect("html-page-context", _drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
