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
