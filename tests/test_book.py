"""The papermill runner, the table of contents and the CLI (no book build here)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from conftest import ROOT, TINY_CHAPTER
from vfnb import book, cli


def _fake_root(tmp_path: Path, stems: list[str]) -> Path:
    (tmp_path / "book").mkdir(parents=True)
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    for stem in stems:
        nbformat.write(nbformat.read(TINY_CHAPTER, as_version=4), tmp_path / "book" / f"{stem}.ipynb")
    chapters = "".join(f"  - file: book/{stem}\n" for stem in stems)
    (tmp_path / "_toc.yml").write_text(f"format: jb-book\nroot: book/intro\nchapters:\n{chapters}")
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    return tmp_path


# --------------------------------------------------------------------------- parameters
def test_notebook_parameters_reads_defaults() -> None:
    assert book.notebook_parameters(TINY_CHAPTER) == {"profile": "cpu", "scale": None, "label": "tiny"}


def test_unknown_parameter_fails_before_running(tmp_path: Path) -> None:
    out = tmp_path / "out.ipynb"
    with pytest.raises(ValueError, match=r"unknown parameter scael .*allowed: profile, scale, label"):
        book.run_chapter(TINY_CHAPTER, {"scael": 2.0}, output_path=out, progress=False)
    assert not out.exists()


def test_several_unknown_parameters_are_all_named() -> None:
    with pytest.raises(book.BookError, match="unknown parameters a, b"):
        book.run_chapter(TINY_CHAPTER, {"b": 1, "a": 2, "scale": 1.0}, output_path="unused.ipynb")


def test_profile_given_twice_must_agree() -> None:
    with pytest.raises(book.BookError, match="profile given twice"):
        book.run_chapter(TINY_CHAPTER, {"profile": "cpu"}, profile="smoke", output_path="unused.ipynb")


def test_run_chapter_injects_parameters(tmp_path: Path) -> None:
    source = TINY_CHAPTER.read_bytes()
    out = book.run_chapter(TINY_CHAPTER, {"scale": 7.5, "label": "hello"}, profile="smoke",
                           output_path=tmp_path / "run" / "tiny.ipynb", progress=False)
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "scale = 7.5" in injected[0].source and 'profile = "smoke"' in injected[0].source
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "profile=smoke scale=7.5 label=hello" in text
    assert TINY_CHAPTER.read_bytes() == source, "the source notebook must not change"


# --------------------------------------------------------------------------- chapters and toc
def test_toc_entries_exist_and_chapters_are_its_notebooks() -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    assert toc["format"] == "jb-book" and toc["root"] == "book/intro"
    docs = book.toc_documents(ROOT)  # raises if an entry has no file
    assert docs[0] == ROOT / "book" / "intro.md"
    assert book.chapters(ROOT) == [d for d in docs if d.suffix == ".ipynb"]
    assert book.chapters(ROOT), "the toc lists no chapter notebook"


@pytest.mark.parametrize("chapter", book.chapters(ROOT), ids=lambda p: p.stem)
def test_source_chapter_conventions(chapter: Path) -> None:
    """Sources are committed without outputs; the first code cell is the parameters cell."""
    nb = nbformat.read(chapter, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{chapter.name} has outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    assert next(iter(book.notebook_parameters(chapter))) == "profile", "first parameter must be profile"


def test_resolve_chapter_by_stem_prefix_and_path(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, ["01_a", "02_b", "02_c"])
    assert book.resolve_chapter("01", root) == root / "book" / "01_a.ipynb"
    assert book.resolve_chapter("02_c", root) == root / "book" / "02_c.ipynb"
    assert book.resolve_chapter(root / "book" / "02_b.ipynb", root) == root / "book" / "02_b.ipynb"
    with pytest.raises(book.BookError, match="ambiguous: it matches 02_b, 02_c"):
        book.resolve_chapter("02", root)
    with pytest.raises(book.BookError, match="unknown chapter '03'; chapters in _toc.yml: 01_a, 02_b, 02_c"):
        book.resolve_chapter("03", root)


def test_missing_toc_file_is_reported(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, ["01_a"])
    (root / "book" / "01_a.ipynb").unlink()
    with pytest.raises(FileNotFoundError, match="book/01_a"):
        book.chapters(root)


def test_stage_keeps_only_selected_chapters_and_no_notebooks(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "src", ["01_a", "02_b"])
    stage = book.prepare_stage(tmp_path / "out", only=["02"], root=root, js_cache=ROOT / "_build" / "js_cache")
    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    assert toc["chapters"] == [{"file": "book/02_b"}]
    assert (stage / "book" / "intro.md").is_file() and not list(stage.rglob("*.ipynb"))
    config = yaml.safe_load((stage / "_config.yml").read_text())["sphinx"]["config"]
    if "nb_ipywidgets_js" in config:  # npm worked: every script named in the config is staged
        scripts = [*config["nb_ipywidgets_js"], config["mathjax_path"]]
        assert all((stage / book.OFFLINE_JS_DIR / s).is_file() for s in scripts)


def test_cdn_fallback_drops_local_script_overrides(tmp_path: Path) -> None:
    config = tmp_path / "_config.yml"
    config.write_text((ROOT / "_config.yml").read_text())
    book._use_cdn(config)
    sphinx = yaml.safe_load(config.read_text())["sphinx"]["config"]
    assert not {"nb_ipywidgets_js", "mathjax_path", "html_static_path"} & set(sphinx)
    assert sphinx["nb_execution_raise_on_error"] is True


def test_build_book_rejects_parameter_no_chapter_takes(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "src", ["01_a"])
    with pytest.raises(book.BookError, match="no chapter takes parameter"):
        book.build_book("smoke", tmp_path / "out", parameters={"nope": 1}, root=root)


# --------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("text, value", [
    ("3", 3), ("0.25", 0.25), ("1e-3", 1e-3), ("True", True), ("false", False), ("None", None),
    ("null", None), ("[0, 1]", [0, 1]), ("mnist5k", "mnist5k"), ("yes", "yes"), ("a: b: c", "a: b: c"),
])
def test_cli_values_are_typed(text: str, value: object) -> None:
    assert cli.parse_value(text) == value and type(cli.parse_value(text)) is type(value)


def test_cli_unknown_parameter_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(TINY_CHAPTER), "-p", "scael", "2"])
    assert exit_info.value.code == 2
    assert "unknown parameter scael" in capsys.readouterr().err


def test_cli_list_shows_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", str(TINY_CHAPTER)]) == 0
    assert "tiny_chapter: profile='cpu', scale=None, label='tiny'" in capsys.readouterr().out


# --------------------------------------------------------------------------- the static book's view
def _widget_notebook(path: Path) -> None:
    """A notebook with a tqdm progress bar (HBox > FloatProgress + HTML) and an explorer (VBox > slider +
    Stack > Image, with a jslink), their state as ipywidgets saves it."""
    def model(name: str, **state: object) -> dict:
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                "state": state}
    state = {
        "bar": model("HBoxModel", children=["IPY_MODEL_label", "IPY_MODEL_progress"], layout="IPY_MODEL_bar_layout"),
        "label": model("HTMLModel", value="rendering", layout="IPY_MODEL_label_layout"),
        "progress": model("FloatProgressModel", value=3, layout="IPY_MODEL_shared_layout"),
        "bar_layout": model("LayoutModel"), "label_layout": model("LayoutModel"),
        "shared_layout": model("LayoutModel"),  # also used by the explorer: must survive
        # the explorer shows the bar's label too: it must survive with its own layout
        "box": model("VBoxModel", children=["IPY_MODEL_label", "IPY_MODEL_slider", "IPY_MODEL_stack"]),
        "slider": model("SelectionSliderModel", layout="IPY_MODEL_shared_layout"),
        "stack": model("StackModel", children=["IPY_MODEL_image"]), "image": model("ImageModel"),
        "link": model("LinkModel", source=["IPY_MODEL_slider", "index"], target=["IPY_MODEL_stack", "selected_index"]),
    }
    view = lambda mid: nbformat.v4.new_output(  # noqa: E731
        "display_data", data={book._WIDGET_VIEW: {"model_id": mid, "version_major": 2, "version_minor": 0},
                              "text/plain": "widget"})
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'cpu'", metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["injected-parameters"]})
    run = nbformat.v4.new_code_cell("res = run()", outputs=[view("bar"), nbformat.v4.new_output("stream", text="done\n")])
    explore = nbformat.v4.new_code_cell("explorer", outputs=[view("box")])
    nb.cells = [params, injected, run, explore]
    nb.metadata["widgets"] = {book._WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, path)


def test_tidy_removes_progress_bars_and_hides_the_parameter_cells(tmp_path: Path) -> None:
    path = tmp_path / "nb.ipynb"
    _widget_notebook(path)
    assert book.tidy_for_html(path) == {"progress bars": 1, "hidden cells": 2}
    nb = nbformat.read(path, as_version=4)
    assert [c.metadata.get("tags") for c in nb.cells[:2]] == [["parameters", "remove-cell"],
                                                             ["injected-parameters", "remove-cell"]]
    assert [o.output_type for o in nb.cells[2].outputs] == ["stream"]  # the bar's output is gone, the text stays
    assert nb.cells[3].outputs[0].data[book._WIDGET_VIEW]["model_id"] == "box"
    state = nb.metadata.widgets[book._WIDGET_STATE]["state"]
    assert set(state) == {"shared_layout", "box", "slider", "stack", "image", "link", "label", "label_layout"}
    assert book.tidy_for_html(path) == {"progress bars": 0, "hidden cells": 0}  # idempotent


def test_map_of_the_book_lists_every_toc_page(tmp_path: Path) -> None:
    entries = book.toc_map()
    assert [e["doc"] for e in entries] == book.toc_documents()
    assert all(e["title"] and e["summary"] for e in entries)
    by_stem = {e["doc"].stem: e for e in entries}
    assert by_stem["02_preliminaries"]["claims"] and not by_stem["03_experimental_setup"]["claims"]
    assert by_stem["02_preliminaries"]["summary"].startswith("Paper §2")  # the chapter module's docstring
    html = book.map_html(current="01_introduction")
    assert html.count("<li>") == len(entries) and "(this page)" in html
    assert all(f'href="{e["page"]}"' in html for e in entries if e["doc"].stem != "01_introduction")
    myst = book.map_myst(current="intro")
    assert all(f"{{doc}}`{e['doc'].stem}`" in myst for e in entries if e["doc"].stem != "intro")


def test_stage_replaces_the_map_marker_from_the_staged_toc(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "src", ["01_a", "02_b"])
    (root / "book" / "intro.md").write_text(f"# Intro\n\n## Chapters\n\n{book.MAP_MARKER}\n")
    stage = book.prepare_stage(tmp_path / "out", only=["02"], root=root, js_cache=ROOT / "_build" / "js_cache")
    text = (stage / "book" / "intro.md").read_text()
    assert book.MAP_MARKER not in text and "{doc}`02_b`" in text and "01_a" not in text


def test_config_shows_its_parameters_once_as_a_table() -> None:
    import vfnb
    cfg = vfnb.resolve("preliminaries", "smoke", alpha=0.3)
    html = cfg._repr_html_()
    for name, value in cfg._values.items():
        if value is not None:
            assert html.count(f"<code>{name}</code>") == 1
    assert "0.3" in html and "profile smoke" in html


def test_sphinx_extension_drops_thebe_and_adds_the_stylesheet() -> None:
    from vfnb import sphinxext

    class Asset(str):
        def __new__(cls, filename: str | None, **attributes: str):
            obj = super().__new__(cls, filename or "")
            obj.filename, obj.attributes = filename, attributes
            return obj
    context = {"script_files": [Asset(None, body='const THEBE_JS_URL = "x"'), Asset("_static/sphinx-thebe.js"),
                                Asset("_static/require.js"),
                                Asset(None, type="application/vnd.jupyter.widget-state+json",
                                      body='{"state": {"image": "iVBORthEBE88ff"}}')],  # base64 may hold "thebe"
               "css_files": [Asset("_static/sphinx-thebe.css"), Asset("_static/vfnb.css")]}
    sphinxext._drop_thebe(None, "page", "page.html", context, None)
    assert [a.filename for a in context["script_files"]] == ["_static/require.js", None]
    assert [a.filename for a in context["css_files"]] == ["_static/vfnb.css"]
    assert (sphinxext.STATIC / sphinxext.CSS).is_file()


def test_setup_chapter_lists_every_parameter_of_every_chapter() -> None:
    from vfnb.chapters import experimental_setup as setup
    from vfnb.config import EXPERIMENTS
    rows = setup.parameters_table("pruning")
    assert [r["parameter"].strip("`") for r in rows] == list(EXPERIMENTS["pruning"]["cpu"])
    assert rows[0]["paper"] == repr(EXPERIMENTS["pruning"]["paper"][rows[0]["parameter"].strip("`")])
    html = setup.parameters_by_chapter().data
    assert html.count("<details>") == len(EXPERIMENTS)
    with pytest.raises(ValueError, match="unknown chapter id"):
        setup.parameters_table("nope")


# --------------------------------------------------------------------------- cache of executed chapters
def test_an_unchanged_chapter_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same notebook, parameters and library: the second build copies the executed chapter (and its recorded
    results) instead of running it; another parameter value, an edited notebook or use_cache=False run it."""
    import json

    monkeypatch.setenv("VFNB_CACHE", str(tmp_path / "zoo"))
    root = _fake_root(tmp_path / "src", ["01_a"])
    chapter = root / "book" / "01_a.ipynb"
    results_dir = tmp_path / "results"
    sidecar = results_dir / "smoke" / "a.json"

    def run(params, name, **kw):
        out = tmp_path / name
        cached = book.execute_chapter(chapter, params, out, results_dir, "smoke", progress=False, root=root, **kw)
        return cached, nbformat.read(out, as_version=4)

    first, nb1 = run({"scale": 2.0}, "1.ipynb")
    assert not first
    entry = tmp_path / "zoo" / book.EXECUTED / book.run_key(chapter, {"scale": 2.0, "profile": "smoke"})
    (entry / "results.json").write_text(json.dumps({"chapter": "a"}))  # as if the chapter had recorded results
    second, nb2 = run({"scale": 2.0}, "2.ipynb")
    assert second and nb2.cells[2].outputs == nb1.cells[2].outputs
    assert json.loads(sidecar.read_text()) == {"chapter": "a"}, "the recorded results come with the notebook"
    assert not run({"scale": 2.0}, "3.ipynb", use_cache=False)[0]
    # what a later build would miss on: another value, an edited notebook, another library source
    key = book.run_key(chapter, {"scale": 2.0, "profile": "smoke"})
    assert book.run_key(chapter, {"scale": 3.0, "profile": "smoke"}) != key
    assert book.run_key(chapter, {"scale": 2.0, "profile": "smoke"}, "another digest") != key
    nb = nbformat.read(chapter, as_version=4)
    nb.cells[2].source += "\nprint('edited')"
    nbformat.write(nb, chapter)
    assert book.run_key(chapter, {"scale": 2.0, "profile": "smoke"}) != key


def test_a_chapter_run_stores_what_it_recorded_and_result_readers_always_run(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh run's recorded results go into the cache with its notebook (and come back on a hit); the pages that
    read other chapters' results (book.READS_RESULTS) are never served from the cache."""
    from conftest import FIXTURES

    monkeypatch.setenv("VFNB_EXECUTED", str(tmp_path / "executed"))
    results_dir = tmp_path / "results"
    chapter = FIXTURES / "sweep_point.ipynb"  # records a table through vfnb.results, as chapters do
    params = {"x": 3.0}
    assert not book.execute_chapter(chapter, params, tmp_path / "1.ipynb", results_dir, "smoke", progress=False)
    recorded = results_dir / "smoke" / "sweep_point.json"
    first = recorded.read_text()
    recorded.unlink()
    assert book.execute_chapter(chapter, params, tmp_path / "2.ipynb", results_dir, "smoke", progress=False)
    assert recorded.read_text() == first and '"value": 3.0' in first
    root = _fake_root(tmp_path / "src", ["08_reproduction"])
    reader = root / "book" / "08_reproduction.ipynb"
    assert not book.execute_chapter(reader, {}, tmp_path / "a.ipynb", results_dir, "smoke", progress=False, root=root)
    assert sorted(p.name for p in (tmp_path / "executed").iterdir()) == [
        book.run_key(chapter, {**params, "profile": "smoke"})], "only the first chapter was stored"
