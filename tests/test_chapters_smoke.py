"""Every chapter in _toc.yml executes at profile ``smoke`` (the same runs feed the browser test)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, BookRun
from vfnb import book


@pytest.mark.slow
@pytest.mark.parametrize("chapter", book.chapters(ROOT), ids=lambda p: p.stem)
def test_chapter_runs_at_smoke(chapter: Path, smoke_book: BookRun) -> None:
    executed = nbformat.read(smoke_book.execute(chapter), as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "every code cell must have run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"error outputs: {[e.ename for e in errors]}"
    injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'profile = "smoke"' in injected[0].source
