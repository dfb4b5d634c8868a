"""The built book in headless chromium, offline: figures render and explorers switch figures.

Needs chromium (``apt-get install -y chromium``); the test is skipped without it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from conftest import BookRun
from vfnb import book

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Page errors that come from Jupyter Book itself, not from this book (sphinx-thebe declares its
#: config constant twice in every page).
KNOWN_PAGE_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    exe = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                if p and Path(p).is_file()), None)
    if exe is None:
        pytest.skip("chromium not found: install it with `apt-get install -y chromium` (Debian) "
                    "to run the browser test")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu",
                                                               "--disable-background-networking"])
        yield browser
        browser.close()


class OfflinePage:
    """A page whose requests to anything but file:// are aborted and recorded."""

    def __init__(self, browser: object, path: Path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
        self.remote: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.as_uri(), wait_until="load")

    def _route(self, route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        if url.startswith(("file://", "blob:", "data:")):
            route.continue_()  # type: ignore[attr-defined]
        else:
            self.remote.append(url)
            route.abort()  # type: ignore[attr-defined]

    def check_offline(self) -> None:
        assert not self.remote, f"the page needs the network: {self.remote}"
        assert not self.failed, f"requests failed: {self.failed}"
        errors = [e for e in self.errors if not any(k in e for k in KNOWN_PAGE_ERRORS)]
        assert not errors, f"JavaScript errors: {errors}"


def check_page(browser: object, page_path: Path, out_dir: Path, min_images: int = 0) -> int:
    """Open a page offline, check its images and move every explorer; return how many explorers."""
    view = OfflinePage(browser, page_path)
    page = view.page
    page.wait_for_timeout(500)
    widget_scripts = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if widget_scripts:  # rendered widgets replace their script tag's placeholder
        page.wait_for_selector(".jupyter-widgets", state="attached", timeout=20_000)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=20_000)
    broken = page.evaluate("""() => [...document.querySelectorAll('main img')]
        .filter(i => i.naturalWidth === 0 || i.getBoundingClientRect().width === 0).map(i => i.src.slice(0, 80))""")
    assert not broken, f"{page_path.name}: images missing or of zero size: {broken}"
    assert page.locator("main img").count() >= min_images, f"{page_path.name}: expected figures"
    page.screenshot(path=str(out_dir / f"{page_path.stem}.png"), full_page=True)

    explorers = page.locator(".cell_output .widget-vbox:has(.noUi-handle):has(img.widget-image)")
    count = explorers.count()
    for i in range(count):
        box = explorers.nth(i)
        box.scroll_into_view_if_needed()
        handle = box.locator(".noUi-handle").first
        steps = int(float(handle.get_attribute("aria-valuemax") or 0))
        assert steps >= 1, "an explorer with one grid point cannot be moved"
        at_end = float(handle.get_attribute("aria-valuenow") or 0) >= steps
        image = box.locator("img.widget-image").first
        before_src, before = image.get_attribute("src"), image.screenshot()
        readout = box.locator(".widget-readout").first.inner_text()
        handle.focus()
        page.keyboard.press("ArrowLeft" if at_end else "ArrowRight")
        page.wait_for_timeout(300)
        image = box.locator("img.widget-image").first
        assert box.locator(".widget-readout").first.inner_text() != readout, "the slider did not move"
        assert image.get_attribute("src") != before_src and image.screenshot() != before, \
            f"{page_path.name}: explorer {i}: moving the slider did not switch the figure"
    if count:
        page.screenshot(path=str(out_dir / f"{page_path.stem}_moved.png"), full_page=True)
    view.check_offline()
    page.close()
    return count


def test_book_pages_work_offline(browser: object, smoke_book: BookRun, tmp_path: Path) -> None:
    """Every page of the smoke book: no network, images render, every explorer switches figures."""
    smoke_book.index()
    for doc in book.toc_documents(smoke_book.root):
        check_page(browser, smoke_book.page(doc), tmp_path, min_images=int(doc.suffix == ".ipynb"))


def test_explorers_switch_figures_without_kernel(browser: object, tiny_book: BookRun, tmp_path: Path) -> None:
    """The fixture chapter's explorer and 2-D explorer (slider + dropdown) work in the static page."""
    page_path = tiny_book.page(tiny_book.chapters[0])
    assert check_page(browser, page_path, tmp_path) == 2
    view = OfflinePage(browser, page_path)
    box = view.page.locator(".cell_output .widget-vbox:has(select)").first
    view.page.wait_for_selector(".widget-vbox select", state="attached")
    before = box.locator("img.widget-image").first.screenshot()
    box.locator("select").select_option(index=1)
    view.page.wait_for_timeout(300)
    assert box.locator("img.widget-image").first.screenshot() != before, "the dropdown did not switch the figure"
    view.check_offline()
