"""Screenshots of every page of a built book at 1280 px, for a person to look at (issue 18).

    python tests/screenshots.py [BOOK_HTML_DIR] [OUT_DIR]      # defaults: _build/html, _build/screenshots
    make screenshots                                           # the same, after `make book`

Each page is opened offline in headless chromium, as the browser test opens it; the script saves one
full-page PNG per page (``NN_<page>.png``, in reading order) and prints what the browser test's reader
checks (:data:`test_browser.LAYOUT_JS`) and the JavaScript console found on it. Exit status 1 if any
page has a problem.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_browser import OfflinePage, chromium_path, launch  # noqa: E402
from vfnb import book  # noqa: E402


def main(argv: list[str]) -> int:
    html = Path(argv[0] if argv else "_build/html").resolve()
    out = Path(argv[1] if len(argv) > 1 else "_build/screenshots").resolve()
    if not (html / "index.html").is_file():
        print(f"no built book at {html}: run `make book` first, or pass the folder holding index.html")
        return 2
    exe = chromium_path()
    if exe is None:
        print("chromium not found: install it with `apt-get install -y chromium`")
        return 2
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    root = book.repo_root()
    pages = [html / d.relative_to(root).with_suffix(".html") for d in book.toc_documents(root)]
    bad = 0
    with sync_playwright() as p:
        browser = launch(p, exe)
        for i, page in enumerate(pages, 1):
            if not page.is_file():
                print(f"{page.name}: not built")
                bad += 1
                continue
            view = OfflinePage(browser, page)
            view.page.wait_for_timeout(1500)  # widgets and MathJax render
            shot = out / f"{i:02d}_{page.stem}.png"
            problems = view.layout_problems()  # before the full-page screenshot, which resizes the viewport
            view.page.screenshot(path=str(shot), full_page=True)
            if view.errors or view.remote:
                problems["javascript / network"] = [*view.errors, *view.remote]
            bad += bool(problems)
            print(f"{shot.name}: {'ok' if not problems else problems}")
            view.page.close()
        browser.close()
    print(f"{len(pages)} pages, {bad} with problems; screenshots in {out}")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
