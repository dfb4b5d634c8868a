"""Shared fixtures: one smoke execution of every chapter and one HTML build per session."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests train into their own zoo, so a user's cache never changes what they see (and vice versa).
# Set VFNB_TEST_CACHE to reuse one between runs.
os.environ["VFNB_CACHE"] = os.environ.get("VFNB_TEST_CACHE") or tempfile.mkdtemp(prefix="vfnb-test-zoo-")
# Chapters record their results (vfnb.results) here, and the conclusion page of the smoke book reads them.
os.environ["VFNB_RESULTS"] = tempfile.mkdtemp(prefix="vfnb-test-results-")

from vfnb import book

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CHAPTER = FIXTURES / "tiny_chapter.ipynb"
#: npm is asked once per machine: the tests share the repo's cache of the offline scripts.
JS_CACHE = ROOT / "_build" / "js_cache"


class BookRun:
    """Chapters of one book executed at ``profile`` into one stage, each at most once.

    Tests of single chapters call :meth:`execute`; the browser test calls :meth:`index`,
    which executes whatever is left and builds the HTML once.
    """

    def __init__(self, out: Path, root: Path = ROOT, profile: str = "smoke"):
        self.out, self.root, self.profile = out, root, profile
        self._stage: Path | None = None
        self._results: dict[Path, Path | BaseException] = {}
        self._index: Path | BaseException | None = None

    @property
    def chapters(self) -> list[Path]:
        return book.chapters(self.root)

    @property
    def stage(self) -> Path:
        if self._stage is None:
            self._stage = book.prepare_stage(self.out, root=self.root, js_cache=JS_CACHE)
        return self._stage

    def execute(self, chapter: Path) -> Path:
        """The executed copy of ``chapter`` (re-raises the error of a failed run)."""
        if chapter not in self._results:
            try:
                self._results[chapter] = book.run_chapter(
                    chapter, output_path=book.stage_path(self.stage, chapter, self.root),
                    profile=self.profile, progress=False, root=self.root)
            except Exception as err:  # noqa: BLE001 - kept and re-raised per test
                self._results[chapter] = err
        result = self._results[chapter]
        if isinstance(result, BaseException):
            raise result
        return result

    def index(self) -> Path:
        """``index.html`` of the built book; fails if any chapter or the build failed."""
        if self._index is None:
            failed = []
            for chapter in self.chapters:
                try:
                    self.execute(chapter)
                except Exception as err:  # noqa: BLE001
                    failed.append(f"{chapter.stem}: {type(err).__name__}: {str(err)[:300]}")
            if failed:
                self._index = RuntimeError("chapters failed, so the book was not built:\n" + "\n".join(failed))
            else:
                try:
                    self._index = book.render_book(self.stage, self.out)
                except Exception as err:  # noqa: BLE001
                    self._index = err
        if isinstance(self._index, BaseException):
            pytest.fail(str(self._index), pytrace=False)
        return self._index

    def page(self, doc: Path) -> Path:
        """The HTML page of a source document of this book."""
        return self.index().parent / doc.relative_to(self.root).with_suffix(".html")


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory: pytest.TempPathFactory) -> BookRun:
    """The repository's book, executed at profile ``smoke`` (lazily, once per session)."""
    return BookRun(tmp_path_factory.mktemp("smoke_book"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-chapter book (the fixture chapter, with explorers) using the repo's _config.yml."""
    root = tmp_path_factory.mktemp("tiny_root")
    (root / "book").mkdir()
    shutil.copy2(ROOT / "_config.yml", root / "_config.yml")
    shutil.copy2(TINY_CHAPTER, root / "book" / "tiny_chapter.ipynb")
    (root / "book" / "intro.md").write_text("# Tiny book\n\nA test book with one chapter.\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/tiny_chapter\n")
    return root


@pytest.fixture(scope="session")
def tiny_book(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> BookRun:
    return BookRun(tmp_path_factory.mktemp("tiny_book"), root=tiny_root)
