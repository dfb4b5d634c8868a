"""The built book in headless chromium, offline, as a reader meets it (issue 18).

On every page: no network, no JavaScript error (no whitelist), figures render and every explorer switches
figures; no paragraph that is a broken Markdown table; no blank block taller than 40 px in the column;
every figure shown at >= 75 % of its natural width (or naturally within the column); every table wider
than the column inside a visible scroll box; no display equation wider than the column; nothing that widens
the page; and the map of the book lists every page of ``_toc.yml``.

Needs chromium (``apt-get install -y chromium``); the test is skipped without it.
``benchmarks/screenshots.py`` takes the same pages' screenshots for a person to look at.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from conftest import BookRun
from vfnb import book

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Reader-facing checks, run in the page; each returns what it found wrong (empty lists: the page is fine).
LAYOUT_JS = r"""() => {
  const article = document.querySelector('main article') || document.querySelector('main');
  const cs = getComputedStyle(article);
  const column = article.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const shown = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const label = el => (el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
                        ? '.' + el.className.trim().split(/\s+/).slice(0, 2).join('.') : '')
                       + ' near "' + (el.previousElementSibling ? el.previousElementSibling.innerText || '' : '').slice(0, 40) + '"');
  const out = {column, markdown_rows: [], blank: [], small_figures: [], clipped_tables: [], wide_equations: [],
               page_overflow: []};
  const doc = document.documentElement;  // nothing may widen the page itself (it squeezes the sidebar)
  if (doc.scrollWidth > doc.clientWidth + 1) out.page_overflow.push(`page is ${doc.scrollWidth} px wide in a ${doc.clientWidth} px window`);
  for (const p of article.querySelectorAll('p')) {
    const first = p.innerText.trim().split('\n')[0];
    if (/^\|.*\|$/.test(first) || /\|\s*[-—:]{2,}\s*\|/.test(p.innerText)) out.markdown_rows.push(first.slice(0, 80));
  }
  // blank: no text and no media; consecutive blank siblings add up (a stack of 32-px residues is one gap)
  const media = 'img,svg,canvas,video,iframe,input,select,textarea,mjx-container,.noUi-handle,.MathJax';
  const blank = el => !el.matches(media + ',hr,br,script,style,td,th,tr,thead,tbody,table') && !el.closest('mjx-container')
                      && el.getBoundingClientRect().height > 0 && (el.innerText ?? el.textContent ?? '').trim() === '' && !el.querySelector(media);
  const reported = [];
  for (const parent of [article, ...article.querySelectorAll('*')]) {
    if (reported.some(r => r.contains(parent))) continue;
    let run = [];
    const flush = () => {
      if (run.length) {
        const top = run[0].getBoundingClientRect().top, bottom = run[run.length - 1].getBoundingClientRect().bottom;
        if (bottom - top > 40) { out.blank.push(label(run[0]) + ` (${run.length} element(s), ${Math.round(bottom - top)} px)`); reported.push(...run); }
      }
      run = [];
    };
    for (const child of parent.children) {
      if (child.getBoundingClientRect().height === 0 || child.closest('details:not([open]) > :not(summary)')) continue;
      if (blank(child)) run.push(child); else flush();
    }
    flush();
  }
  for (const img of article.querySelectorAll('img')) {
    if (!shown(img) || !img.naturalWidth) continue;
    const w = img.getBoundingClientRect().width;
    if (w < 0.75 * img.naturalWidth && img.naturalWidth > column + 1)
      out.small_figures.push(`${img.src.split('/').pop().slice(0, 24)}: ${img.naturalWidth} px shown at ${Math.round(w)} px`);
  }
  for (const t of article.querySelectorAll('table')) {
    if (!shown(t) || t.scrollWidth <= column + 1) continue;
    let box = t.parentElement;
    while (box && box !== article && !['auto', 'scroll'].includes(getComputedStyle(box).overflowX)) box = box.parentElement;
    const ok = box && box !== article && box.getBoundingClientRect().width <= column + 1
               && box.scrollWidth > box.clientWidth && box.offsetHeight - box.clientHeight > 0;
    if (!ok) out.clipped_tables.push(`table of ${t.scrollWidth} px (${t.innerText.trim().slice(0, 40)})`
                                     + (box && box !== article ? ', its scroll box shows no scrollbar' : ', no scroll box'));
  }
  for (const eq of article.querySelectorAll('mjx-container[display="true"]')) {
    const math = eq.querySelector('mjx-math') || eq;
    const w = math.getBoundingClientRect().width;
    if (shown(eq) && w > column + 1) out.wide_equations.push(`${Math.round(w)} px: ${eq.textContent.slice(0, 40)}`);
  }
  return out;
}"""


def chromium_path() -> str | None:
    """The chromium executable (Debian's ``/usr/bin/chromium`` first), or None."""
    return next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).is_file()), None)


def launch(playwright: object, exe: str) -> object:
    """Headless chromium as a reader's browser: scrollbars shown (Playwright hides them by default), so a
    table's scroll box is visible and the checks can see it."""
    return playwright.chromium.launch(  # type: ignore[attr-defined]
        executable_path=exe, ignore_default_args=["--hide-scrollbars"],
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium not found: install it with `apt-get install -y chromium` (Debian) "
                    "to run the browser test")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    with sync_playwright() as p:
        browser = launch(p, exe)
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
        assert not self.errors, f"JavaScript errors: {self.errors}"

    def layout_problems(self) -> dict[str, list[str]]:
        """What :data:`LAYOUT_JS` finds wrong on the page, by check (only the checks that found something),
        once MathJax has typeset the page."""
        self.page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise"
                           " ? MathJax.startup.promise.then(() => true) : true")
        found = self.page.evaluate(LAYOUT_JS)
        return {k: v for k, v in found.items() if k != "column" and v}


def check_page(browser: object, page_path: Path, out_dir: Path, min_images: int = 0) -> int:
    """Open a page offline, check its images and move every explorer; return how many explorers."""
    view = OfflinePage(browser, page_path)
    page = view.page
    page.wait_for_timeout(500)
    widget_scripts = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if widget_scripts:  # rendered widgets replace their script tag's placeholder
        page.wait_for_selector(".jupyter-widgets", state="attached", timeout=20_000)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=20_000)
    unrendered = page.evaluate("""() => [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
        .filter(s => !s.parentElement.querySelector('.jupyter-widgets')).length""")
    assert not unrendered, f"{page_path.name}: {unrendered} widget(s) not rendered (is the widget state in the page?)"
    broken = page.evaluate("""() => [...document.querySelectorAll('main img')]
        .filter(i => i.naturalWidth === 0 || i.getBoundingClientRect().width === 0).map(i => i.src.slice(0, 80))""")
    assert not broken, f"{page_path.name}: images missing or of zero size: {broken}"
    assert page.locator("main img").count() >= min_images, f"{page_path.name}: expected figures"
    problems = view.layout_problems()  # before the full-page screenshot, which resizes the viewport
    page.screenshot(path=str(out_dir / f"{page_path.stem}.png"), full_page=True)
    assert not problems, f"{page_path.name}: {problems}"

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
    """Every page of the smoke book: no network or JavaScript error, images render, every explorer switches
    figures, and the page passes the reader's checks of :data:`LAYOUT_JS`."""
    smoke_book.index()
    failures = []
    for doc in book.toc_documents(smoke_book.root):
        try:
            check_page(browser, smoke_book.page(doc), tmp_path, min_images=int(doc.suffix == ".ipynb"))
        except AssertionError as err:  # every page's problems in one report
            failures.append(str(err))
    assert not failures, "\n".join(failures)


def test_map_of_the_book_lists_every_page(browser: object, smoke_book: BookRun) -> None:
    """Chapter 1's map and the landing page's chapter list link to every page of ``_toc.yml``."""
    smoke_book.index()
    docs = book.toc_documents(smoke_book.root)
    for page, selector in (("01_introduction", "ul.vfnb-map a"), ("intro", "section#chapters a")):
        doc = next(d for d in docs if d.stem == page)
        view = OfflinePage(browser, smoke_book.page(doc))
        links = {h.split("#")[0].split("/")[-1] for h in view.page.eval_on_selector_all(
            selector, "els => els.map(a => a.getAttribute('href'))")}
        missing = [d.stem for d in docs if d.stem != page and f"{d.stem}.html" not in links]
        assert not missing, f"the map on {page}.html does not list {missing}"
        view.page.close()


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
