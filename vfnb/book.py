"""Run chapters with papermill and build the static HTML book.

Chapters are the notebooks listed in the root ``_toc.yml``. Their sources under ``book/`` are
never executed in place: :func:`run_chapter` writes an executed copy, and :func:`build_book`
executes every chapter into a staging copy of the book that ``jupyter-book`` turns into HTML.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

#: Folder (inside the staged book) whose content Sphinx copies into ``_static/``. Not
#: ``_static`` itself: Jupyter Book would load every script there a second time.
OFFLINE_JS_DIR = "offline_js"
#: npm packages that render the embedded widget state and the maths without a CDN.
NPM_PACKAGES = ("@jupyter-widgets/html-manager@1.0.6", "requirejs@2.3.4", "mathjax@3.2.2")
EXPECTED_JS = ("require.js", "widgets/embed-amd.js", "mathjax/tex-mml-chtml.js")
#: Loaded between require.js and embed-amd.js.
#: 1. The html-manager bundle locates its fonts and chunks from its AMD module ids, i.e. beside
#:    the page (``<page dir>/@jupyter-widgets/...``); mapping the ids to ``_static/widgets/``
#:    makes them resolve there, with no CDN.
#: 2. It typesets widget labels with the MathJax 2 call ``MathJax.Hub.Queue``, which MathJax 3
#:    (loaded by Sphinx on pages with maths) lacks: a small ``Hub`` forwards to MathJax 3.
WIDGETS_CONFIG_JS = """\
// vfnb: serve the widget manager from _static/widgets/ and let it typeset with MathJax 3.
(function () {
  var dist = document.currentScript.src.replace(/[^/]*$/, "") + "widgets";
  var paths = {"@jupyter-widgets/html-manager/dist": dist};
  ["base", "controls", "html-manager"].forEach(function (name) {
    paths["@jupyter-widgets/" + name] = dist + "/" + name;
  });
  require.config({paths: paths});
  window.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.startup) return;
    mj.Hub = {Queue: function (job) {
      var element = job && job[2];
      if (element) mj.startup.promise.then(function () { return mj.typesetPromise([element]); });
    }};
  });
})();
"""


_TOC_CHILDREN = ("parts", "chapters", "sections")  # keys of a jb-book toc that hold entries


class BookError(ValueError):
    """A usage error found before anything runs: unknown chapter or parameter."""


def parse_value(text: str) -> Any:
    """Type a ``-p`` value like papermill: None, bools, ints, floats, YAML lists/dicts, else str."""
    low = text.strip().lower()
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (list, dict)) else text


# --------------------------------------------------------------------------- locating chapters
def repo_root(start: Path | None = None) -> Path:
    """The folder holding ``_toc.yml``: beside the package, else ``start``/cwd or a parent."""
    here = Path(__file__).resolve().parent.parent
    if (here / "_toc.yml").is_file():
        return here
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "_toc.yml").is_file():
            return folder
    raise FileNotFoundError(f"no _toc.yml found beside {here} or in {start} and its parents")


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root).resolve() if root else repo_root()


def _toc_files(node: Any) -> Iterator[str]:
    """Every ``file``/``root`` entry of a jb-book table of contents, in reading order."""
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                yield node[key]
        for key in _TOC_CHILDREN:
            for child in node.get(key) or []:
                yield from _toc_files(child)
    elif isinstance(node, list):
        for child in node:
            yield from _toc_files(child)


def _resolve_doc(root: Path, entry: str) -> Path:
    path = root / entry
    if path.suffix in (".ipynb", ".md") and path.is_file():
        return path
    for suffix in (".ipynb", ".md"):
        if path.with_name(path.name + suffix).is_file():
            return path.with_name(path.name + suffix)
    raise FileNotFoundError(f"_toc.yml lists {entry!r}, but neither {entry}.ipynb nor {entry}.md exists")


def toc_documents(root: Path | None = None) -> list[Path]:
    """All documents (markdown and notebooks) listed in ``_toc.yml``, in order."""
    root = _root(root)
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    return [_resolve_doc(root, entry) for entry in _toc_files(toc)]


def chapters(root: Path | None = None) -> list[Path]:
    """The chapter notebooks listed in ``_toc.yml``, in reading order."""
    return [p for p in toc_documents(root) if p.suffix == ".ipynb"]


_all_chapters = chapters  # build_book's ``chapters`` argument shadows the function


def chapter_id(chapter: str | os.PathLike) -> str:
    """A chapter's id: its notebook's stem without the number prefix (``05_4_preserve_first_merging`` ->
    ``preserve_first_merging``; appendix chapters carry an ``A``: ``A8_4_vision_transformers``), the key of ``vfnb.config.EXPERIMENTS`` and the module of ``vfnb.chapters``."""
    import re

    stem = Path(chapter).stem
    cid = re.sub(r"^(?:A?\d+)(?:_\d+)*_", "", stem)
    if not cid or cid == stem and stem[:1].isdigit():
        raise BookError(f"chapter {stem!r} has no id: name chapter notebooks <number>_<id>.ipynb, e.g. 04_linear_networks (appendix: A1_closed_forms)")
    return cid


def resolve_chapter(chapter: str | os.PathLike, root: Path | None = None) -> Path:
    """Find a chapter by path, file stem (``04_linear_networks``) or unique prefix (``04``)."""
    path = Path(chapter)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    known = chapters(root)
    name = path.stem if path.suffix == ".ipynb" else str(chapter)
    exact = [p for p in known if p.stem == name]
    matches = exact or [p for p in known if p.stem.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(p.stem for p in known) or "(none)"
    if matches:
        raise BookError(f"chapter {name!r} is ambiguous: it matches {', '.join(p.stem for p in matches)}")
    raise BookError(f"unknown chapter {name!r}; chapters in _toc.yml: {names}")


def notebook_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """Names and defaults of the notebook's ``parameters`` cell (defaults as Python values)."""
    import ast

    import papermill as pm

    found = pm.inspect_notebook(str(path))
    out: dict[str, Any] = {}
    for name, info in found.items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            out[name] = info["default"]  # an expression: keep its source text
    return out


def check_parameters(path: Path, parameters: Mapping[str, Any]) -> None:
    """Raise :class:`BookError` if a name is not in the notebook's ``parameters`` cell."""
    allowed = notebook_parameters(path)
    unknown = sorted(set(parameters) - set(allowed))
    if not allowed and parameters:
        raise BookError(f"{path.name} has no cell tagged 'parameters', so it takes no parameters "
                        f"(got {', '.join(unknown)})")
    if unknown:
        raise BookError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"for {path.stem}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------- the map of the book
#: A line in a markdown page that :func:`prepare_stage` replaces with the map of the book.
MAP_MARKER = "<!-- vfnb: map of the book -->"


def _first_paragraph(text: str) -> str:
    paragraph = []
    for line in text.strip().splitlines():
        if not line.strip():
            if paragraph:
                break
            continue
        if line.startswith("#"):
            continue
        paragraph.append(line.strip())
    return " ".join(paragraph)


def toc_map(root: Path | None = None, toc: Any = None) -> list[dict[str, Any]]:
    """Every document of ``_toc.yml`` in reading order: ``doc`` (path), ``page`` (its HTML file name),
    ``title`` (first heading), ``summary`` (the chapter module's docstring, else the page's first
    paragraph) and ``claims`` (whether the chapter shows a claims table). Used by :func:`map_html` and
    :func:`map_myst`, so the map of the book is never out of date. ``toc`` (a loaded ``_toc.yml``)
    defaults to the one in ``root``."""
    import ast
    import json
    import re

    root = _root(root)
    if toc is None:
        toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    out = []
    for doc in (_resolve_doc(root, entry) for entry in _toc_files(toc)):
        if doc.suffix == ".ipynb":
            cells = json.loads(doc.read_text(encoding="utf-8"))["cells"]
            text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
            code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
            module = Path(__file__).resolve().parent / "chapters" / f"{chapter_id(doc)}.py"
            summary = _first_paragraph(ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))) or "") \
                if module.is_file() else ""
            claims = bool(re.search(r"claims\.show\(|claims_html\(", code))
        else:
            text, summary, claims = doc.read_text(encoding="utf-8"), "", False
        heading = next((ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("# ")), doc.stem)
        summary = summary or _first_paragraph(text)
        summary = re.sub(r"(?::\w+:)?``?([^`]+)``?", r"`\1`", summary)  # rST literals and roles as code
        summary = re.split(r"(?<=[.!?])\s+(?=[A-Z*`])", summary, maxsplit=1)[0]  # the first sentence
        out.append({"doc": doc, "page": doc.with_suffix(".html").name, "title": heading,
                    "summary": summary, "claims": claims})
    return out


def map_html(root: Path | None = None, current: str | None = None) -> str:
    """The map of the book as an HTML list of links (pages beside each other in ``book/``), from
    :func:`toc_map`; ``current`` (a document stem) is marked as this page."""
    import html
    import re

    items = []
    for e in toc_map(root):
        title = html.escape(e["title"])
        link = f"<strong>{title}</strong> (this page)" if e["doc"].stem == current else \
            f'<a href="{e["page"]}"><strong>{title}</strong></a>'
        summary = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(e["summary"]))
        summary = re.sub(r"\*([^*]+)\*", r"<em>\1</em>", summary)
        tail = " It ends with a claims table." if e["claims"] else ""
        items.append(f"<li>{link}: {summary}{tail}</li>")
    return f'<ul class="vfnb-map">{"".join(items)}</ul>'


def map_myst(root: Path | None = None, toc: Any = None, current: str | None = None) -> str:
    """The map of the book as a MyST list of ``{doc}`` links, from :func:`toc_map` (for markdown pages;
    ``current``, the page's own stem, is left out)."""
    lines = []
    for e in toc_map(root, toc):
        if e["doc"].stem == current:
            continue
        tail = " It ends with a claims table." if e["claims"] else ""
        lines.append(f"- {{doc}}`{e['doc'].stem}`: {e['summary']}{tail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running chapters
@contextmanager
def _importable() -> Iterator[None]:
    """Let the kernel import this ``vfnb`` even when it is not pip-installed."""
    old = os.environ.get("PYTHONPATH")
    package_parent = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, old) if p)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set an environment variable (seen by the papermill kernels) for the duration of a block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def validate_run(path: Path, parameters: Mapping[str, Any]) -> None:
    """Check a chapter's parameters before anything runs: every name must be in its ``parameters`` cell
    (:class:`BookError`), and for a chapter of :data:`vfnb.config.EXPERIMENTS` every value must pass the chapter's
    configuration checks (:class:`vfnb.config.ConfigError`, the message the notebook would raise)."""
    from .config import EXPERIMENTS, resolve

    check_parameters(path, parameters)
    try:
        cid = chapter_id(path)
    except BookError:
        return  # not a numbered chapter (e.g. a notebook of the user's own): its names are all we can check
    if cid in EXPERIMENTS:
        with warnings.catch_warnings():  # sizes clamped to the dataset warn once, when the notebook runs
            warnings.simplefilter("ignore")
            resolve(cid, **dict(parameters))


def run_chapter(chapter: str | os.PathLike, parameters: Mapping[str, Any] | None = None,
                output_path: str | os.PathLike | None = None, profile: str | None = None,
                progress: bool = True, cwd: str | os.PathLike | None = None,
                root: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Execute one chapter with papermill and return the executed notebook's path.

    ``parameters`` are checked (:func:`validate_run`) *before* anything runs.
    ``profile`` is a shortcut for ``parameters["profile"]``. The output defaults to
    ``_build/executed/<path relative to the repo>``; ``cwd`` defaults to the notebook's folder. ``env``: environment
    variables the kernel sees (e.g. ``VFNB_RESULTS``, ``OMP_NUM_THREADS``).
    """
    import papermill as pm

    root = _root(root)
    path = resolve_chapter(chapter, root)
    params = dict(parameters or {})
    if profile is not None:
        if params.get("profile", profile) != profile:
            raise BookError(f"profile given twice: profile={profile!r} and parameters['profile']="
                            f"{params['profile']!r}")
        params["profile"] = profile
    validate_run(path, params)
    if output_path is None:
        try:
            rel = path.relative_to(root)
        except ValueError:
            rel = Path(path.name)
        output_path = root / "_build" / "executed" / rel
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with _importable(), ExitStack() as stack:
        for name, value in (env or {}).items():
            stack.enter_context(_environment(name, str(value)))
        pm.execute_notebook(str(path), str(output), parameters=params, kernel_name="python3",
                            progress_bar=progress, cwd=str(cwd or path.parent))
    return output


# --------------------------------------------------------------------------- offline scripts
def _npm_rule(package: str, name: str) -> str | None:
    """Where a file of an npm tarball goes in the script folder (None: not needed)."""
    if package.startswith("requirejs"):
        return "require.js" if name == "require.js" else None
    if package.startswith("jupyter-widgets-html-manager"):
        ok = name.startswith("dist/") and not name.endswith(".map")
        return "widgets/" + name.removeprefix("dist/") if ok else None
    if package.startswith("mathjax"):
        ok = name.startswith("es5/") and name != "es5/node-main.js"
        return "mathjax/" + name.removeprefix("es5/") if ok else None
    return None


def fetch_offline_js(cache: Path) -> Path | None:
    """The widget and MathJax scripts in ``cache`` (fetched once with npm), or None if npm fails.

    Layout: ``require.js``, ``widgets/embed-amd.js`` (+ its chunks and fonts) and
    ``mathjax/tex-mml-chtml.js`` (+ its components). :func:`prepare_stage` copies it, plus
    ``widgets-config.js``, into the staged ``offline_js/``, which Sphinx copies to ``_static/``,
    so ``_config.yml`` can name the scripts relatively.
    """
    cache = Path(cache)
    if all((cache / f).is_file() for f in EXPECTED_JS):
        return cache
    npm = shutil.which("npm")
    if npm is None:
        print("npm not found", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", *NPM_PACKAGES], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            print(f"npm pack failed: {detail.strip()[-500:]}", file=sys.stderr)
            return None
        staging = Path(tmp) / "out"
        for tgz in Path(tmp).glob("*.tgz"):
            with tarfile.open(tgz) as tar:
                for member in tar.getmembers():
                    rel = _npm_rule(tgz.name, member.name.removeprefix("package/")) if member.isfile() else None
                    source = tar.extractfile(member) if rel else None
                    if source is not None:
                        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                        (staging / rel).write_bytes(source.read())
        missing = [f for f in EXPECTED_JS if not (staging / f).is_file()]
        if missing:
            print(f"npm packages lack {', '.join(missing)}", file=sys.stderr)
            return None
        if cache.exists():
            shutil.rmtree(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, cache)
    return cache


def _use_cdn(config_path: Path) -> None:
    """Drop the local-script overrides, so myst-nb and Sphinx load widgets and MathJax from CDNs."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    sphinx_config = (config.get("sphinx") or {}).get("config") or {}
    sphinx_config.pop("nb_ipywidgets_js", None)
    sphinx_config.pop("mathjax_path", None)
    static = [p for p in sphinx_config.get("html_static_path", []) if p != OFFLINE_JS_DIR]
    if static:
        sphinx_config["html_static_path"] = static
    else:
        sphinx_config.pop("html_static_path", None)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


# --------------------------------------------------------------------------- the book
def _filter_toc(node: Any, keep: set[str]) -> Any:
    """Copy of the toc without the ``file`` entries not in ``keep``, nor parts left empty."""
    if isinstance(node, list):
        return [c for c in (_filter_toc(child, keep) for child in node) if c is not None]
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("file"), str) and node["file"] not in keep:
        return None
    out = {k: _filter_toc(v, keep) if k in _TOC_CHILDREN else v for k, v in node.items()}
    out = {k: v for k, v in out.items() if k not in _TOC_CHILDREN or v}
    emptied = any(k in node for k in _TOC_CHILDREN) and not any(k in out for k in _TOC_CHILDREN)
    return None if emptied and not {"file", "root"} & set(out) else out


def prepare_stage(out_dir: str | os.PathLike = "_build", only: Iterable[str | os.PathLike] | None = None,
                  root: Path | None = None, js_cache: Path | None = None) -> Path:
    """Fresh ``<out_dir>/stage``: config, toc, markdown pages, assets and widget scripts.

    Notebooks are not copied: :func:`build_book` executes them into the stage. With
    ``only``, the staged ``_toc.yml`` lists only those chapters (markdown pages stay).
    """
    root = _root(root)
    out = Path(out_dir).resolve()
    stage = out / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    shutil.copy2(root / "_config.yml", stage / "_config.yml")
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    if only is not None:
        wanted = {resolve_chapter(c, root) for c in only}
        toc = _filter_toc(toc, {e for e in _toc_files(toc) if _resolve_doc(root, e).suffix != ".ipynb"
                                or _resolve_doc(root, e) in wanted})
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    for entry in _toc_files(toc):  # markdown pages
        doc = _resolve_doc(root, entry)
        if doc.suffix == ".md":
            target = stage / doc.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            text = doc.read_text(encoding="utf-8")
            if MAP_MARKER in text:  # generated from the staged toc, so it lists exactly what is built
                text = text.replace(MAP_MARKER, map_myst(root, toc, current=doc.stem))
            target.write_text(text, encoding="utf-8")
    book_dir = root / "book"
    if book_dir.is_dir():  # images and other assets the pages refer to
        for asset in book_dir.rglob("*"):
            if asset.is_file() and asset.suffix not in (".ipynb", ".md") and ".ipynb_checkpoints" not in asset.parts:
                target = stage / asset.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(asset, target)
    js = fetch_offline_js(Path(js_cache) if js_cache else out / "js_cache")
    if js is None:
        warnings.warn("could not fetch the widget and MathJax scripts with npm: the book loads them "
                      "from CDNs, so its widgets and maths need an internet connection",
                      RuntimeWarning, stacklevel=2)
        _use_cdn(stage / "_config.yml")
    else:
        shutil.copytree(js, stage / OFFLINE_JS_DIR)
        (stage / OFFLINE_JS_DIR / "widgets-config.js").write_text(WIDGETS_CONFIG_JS, encoding="utf-8")
    return stage


#: Cell tags of the cells a reader of the static book does not need: the parameters cell and the cell
#: papermill injects. The chapter shows its resolved configuration once, as a table, instead.
HIDDEN_TAGS = ("parameters", "injected-parameters")
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_PROGRESS_MODELS = ("FloatProgressModel", "IntProgressModel")


def _model_refs(value: Any) -> Iterator[str]:
    """Model ids a widget state value refers to (``"IPY_MODEL_<id>"`` strings, nested anywhere)."""
    if isinstance(value, str) and value.startswith("IPY_MODEL_"):
        yield value.removeprefix("IPY_MODEL_")
    elif isinstance(value, dict):
        for v in value.values():
            yield from _model_refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _model_refs(v)


def tidy_for_html(notebook: str | os.PathLike) -> dict[str, int]:
    """Prepare an executed chapter for the static book, in place; return what was removed.

    - Progress bars (tqdm's widget: an ``HBox`` holding a ``FloatProgress``) are for live runs: their
      outputs and widget state are removed, so they leave no blank band in the page.
    - The ``parameters`` cell and papermill's injected cell get the ``remove-cell`` tag (the chapter
      displays its resolved configuration right after them).

    Live notebooks and ``vfnb run`` outputs keep both; only :func:`render_book` calls this.
    """
    import nbformat

    path = Path(notebook)
    nb = nbformat.read(path, as_version=4)
    store = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {})
    state = store.get("state", {})
    bars = {mid for mid, m in state.items() if m.get("model_name") == "HBoxModel"
            and any(state.get(c, {}).get("model_name") in _PROGRESS_MODELS
                    for c in _model_refs(m.get("state", {}).get("children", [])))}
    removed = {"progress bars": 0, "hidden cells": 0}
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if any(t in tags for t in HIDDEN_TAGS) and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
            removed["hidden cells"] += 1
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(_WIDGET_VIEW) if out.get("output_type") == "display_data" else None
            if view and view.get("model_id") in bars:
                removed["progress bars"] += 1
                continue
            kept.append(out)
        cell.outputs = kept
    if bars:  # drop the bars' models and the models (layouts, styles, labels) only they refer to
        def reach(start: Iterable[str]) -> set[str]:
            seen, todo = set(), list(start)
            while todo:
                mid = todo.pop()
                if mid not in seen:
                    seen.add(mid)
                    todo.extend(_model_refs(state.get(mid, {}).get("state", {})))
            return seen
        candidates = reach(bars)
        dead = candidates - reach(set(state) - candidates)  # what no surviving model refers to
        store["state"] = {mid: m for mid, m in state.items() if mid not in dead}
    tmp = path.with_name(path.name + ".tmp")  # atomic: an interrupted build never leaves half a notebook
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return removed


def render_book(stage: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Tidy the staged chapters (:func:`tidy_for_html`), then run ``jupyter-book build --all -W --keep-going``
    on the stage; return ``index.html``.

    The HTML lands in ``<out_dir>/html`` (default: the stage's parent).
    """
    stage = Path(stage).resolve()
    out = Path(out_dir).resolve() if out_dir else stage.parent
    for notebook in sorted(stage.rglob("*.ipynb")):
        if "_build" not in notebook.relative_to(stage).parts:
            tidy_for_html(notebook)
    built = stage / "_build"
    if built.exists():
        shutil.rmtree(built)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "jupyter_book"]
    result = subprocess.run([*cmd, "build", str(stage), "--all", "-W", "--keep-going"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}):\n{result.stdout[-6000:]}")
    html = out / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.move(str(built / "html"), str(html))
    index = html / "index.html"
    if not index.is_file():
        raise RuntimeError(f"jupyter-book finished but wrote no {index}")
    return index


def stage_path(stage: Path, chapter: Path, root: Path) -> Path:
    """Where an executed chapter goes in the stage (same path as in the source tree)."""
    return Path(stage) / chapter.relative_to(root)


#: Chapters that read what other chapters recorded (:mod:`vfnb.results`, committed sweep results): they are cheap
#: and always executed, never served from the cache of executed chapters.
READS_RESULTS = frozenset({"conclusion", "reproduction"})
#: Folder of the zoo (``VFNB_CACHE``) that holds executed chapters, keyed by :func:`run_key`.
EXECUTED = ".executed"


def source_digest() -> str:
    """A hash of the installed ``vfnb`` package's source (every ``.py`` and static file) and of torch's and Python's
    versions: what an executed chapter depends on besides its notebook and parameters."""
    import hashlib
    import platform

    import torch

    h = hashlib.sha256(f"torch {torch.__version__} python {platform.python_version()}".encode())
    package = Path(__file__).resolve().parent
    for f in sorted(package.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".css", ".js") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(package)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run_key(path: Path, parameters: Mapping[str, Any], digest: str | None = None) -> str:
    """The cache key of one executed chapter: its notebook's bytes, its parameters and :func:`source_digest` (the
    zoo's entries are keyed by their configuration the same way, so a warm zoo plus an unchanged chapter and library
    is a cache hit). Runtime parameters (device, cache and data folders) are part of the key."""
    import hashlib
    import json

    h = hashlib.sha256(Path(path).read_bytes())
    h.update(json.dumps(dict(parameters), sort_keys=True, default=str).encode())
    h.update((digest or source_digest()).encode())
    return h.hexdigest()[:24]


def executed_cache() -> Path:
    """Where executed chapters are cached: ``$VFNB_EXECUTED``, else the zoo's ``.executed`` folder."""
    from .config import default_cache_dir

    env = os.environ.get("VFNB_EXECUTED")
    return Path(env).expanduser() if env else default_cache_dir() / EXECUTED


def execute_chapter(path: Path, params: Mapping[str, Any], output: Path, results_dir: Path, profile: str,
                    progress: bool = True, root: Path | None = None, use_cache: bool = True,
                    digest: str | None = None) -> bool:
    """Execute the chapter ``path`` into ``output`` (its :mod:`vfnb.results` into ``results_dir``), or copy both from
    the cache of executed chapters (:func:`executed_cache` / :func:`run_key`); return whether the cache served it.
    A fresh run is stored in the cache (atomically, as a folder). ``digest``: :func:`source_digest`, if known."""
    try:
        cid = chapter_id(path)
    except BookError:
        cid = Path(path).stem
    digest = digest or source_digest()
    cacheable = use_cache and cid not in READS_RESULTS
    entry = executed_cache() / run_key(path, {**params, "profile": profile}, digest) if cacheable else None
    sidecar = results_dir / profile / f"{cid}.json"
    if entry is not None and (entry / "chapter.ipynb").is_file():
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(entry / "chapter.ipynb", output)
        if (entry / "results.json").is_file():
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry / "results.json", sidecar)
        return True
    run_chapter(path, params, output_path=output, profile=profile, progress=progress, root=root,
                env={"VFNB_RESULTS": str(results_dir)})
    if entry is not None:
        try:
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            shutil.copy2(output, tmp / "chapter.ipynb")
            if sidecar.is_file():
                shutil.copy2(sidecar, tmp / "results.json")
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        except OSError as exc:  # a read-only or full cache: the build goes on, uncached
            warnings.warn(f"could not store {path.stem} in the cache of executed chapters ({exc})", RuntimeWarning)
    return False


def build_book(profile: str = "cpu", out_dir: str | os.PathLike = "_build",
               chapters: Iterable[str | os.PathLike] | None = None,
               parameters: Mapping[str, Any] | None = None, progress: bool = True,
               root: Path | None = None, use_cache: bool = True) -> Path:
    """Execute every chapter at ``profile`` and build the HTML book; return ``index.html``.

    The chapters record their results (:mod:`vfnb.results`) under ``<out_dir>/results``, where the conclusion
    page, executed last, gathers them.

    ``parameters`` go to every chapter whose parameters cell declares them; a name that no
    selected chapter declares is an error. ``chapters`` limits the build to some chapters.

    With ``use_cache`` (the default), a chapter whose notebook, parameters and library source (:func:`run_key`) are
    those of an earlier build is copied from the zoo's cache of executed chapters instead of being run again; the
    pages that read recorded results (:data:`READS_RESULTS`) always run. Each chapter's wall time (and whether it
    was cached) is printed and written to ``<out_dir>/timings.json``.
    """
    import json
    import time

    root = _root(root)
    selected = [resolve_chapter(c, root) for c in chapters] if chapters is not None else _all_chapters(root)
    params = dict(parameters or {})
    declared = {path: notebook_parameters(path) for path in selected}
    missing = sorted(n for n in params if not any(n in d for d in declared.values()))
    if missing:
        raise BookError(f"no chapter takes parameter(s) {', '.join(missing)}; allowed: "
                        f"{', '.join(sorted(set().union(*declared.values())))}")
    for path in selected:  # every chapter's values are checked before the first one runs
        validate_run(path, {**{k: v for k, v in params.items() if k in declared[path]}, "profile": profile})
    stage = prepare_stage(out_dir, selected if chapters is not None else None, root=root)
    results_dir = Path(out_dir).resolve() / "results"  # where the conclusion page reads every chapter's results
    digest = source_digest()
    timings = []
    for i, path in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] executing {path.stem} (profile {profile})", flush=True)
        own = {k: v for k, v in params.items() if k in declared[path]}
        start = time.perf_counter()
        cached = execute_chapter(path, own, stage_path(stage, path, root), results_dir, profile, progress, root,
                                 use_cache, digest)
        seconds = time.perf_counter() - start
        timings.append({"chapter": path.stem, "seconds": round(seconds, 1), "cached": cached})
        print(f"      {path.stem}: {seconds:.0f} s{' (from the cache of executed chapters)' if cached else ''}",
              flush=True)
    print("building HTML with jupyter-book ...", flush=True)
    start = time.perf_counter()
    index = render_book(stage, out_dir)
    timings.append({"chapter": "(jupyter-book)", "seconds": round(time.perf_counter() - start, 1), "cached": False})
    Path(out_dir, "timings.json").write_text(json.dumps({"profile": profile, "chapters": timings}, indent=1))
    print(f"book written to {index}")
    return index
