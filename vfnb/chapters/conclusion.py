"""Paper §6: the conclusion. Every chapter's claims table in one, gathered from the results the chapters recorded
(:mod:`vfnb.results`) when they ran at this profile; nothing here is typed by hand."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

import nbformat

from ..config import EXPERIMENTS, Config
from ..results import load, results_root
from .common import check_config

#: A claim's verdict as the conclusion reads it.
VERDICTS = {"yes": "holds", "no": "does not hold", "within noise": "not shown at this scale"}


def chapter_titles(pages: Mapping[str, Path]) -> dict[str, tuple[str, str]]:
    """Chapter id -> (its title, the file name of its page), from ``pages`` (chapter id -> notebook path, e.g.
    ``{vfnb.book.chapter_id(p): p for p in vfnb.book.chapters()}``)."""
    out = {}
    for cid, path in pages.items():
        path = Path(path)
        nb = nbformat.read(path, as_version=4)
        title = next((line.lstrip("# ").strip() for c in nb.cells if c.cell_type == "markdown"
                      for line in c.source.splitlines() if line.startswith("# ")), path.stem)
        out[cid] = (title, path.stem + ".html")
    return out


def gather(cfg: Config, pages: Mapping[str, Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every recorded claim of every chapter of ``pages`` (chapter id -> notebook) at ``cfg.profile``, in reading
    order, and one provenance row per chapter: recorded or not, when, with which vfnb. Chapters without a claims
    table (1, 3) are left out."""
    check_config(cfg, "conclusion")
    titles = chapter_titles(pages)
    rows, runs = [], []
    for cid in pages:  # reading order (_toc.yml)
        if cid == "conclusion" or cid not in EXPERIMENTS:
            continue
        title, page = titles[cid]
        data = load(cid, cfg.profile, cfg.results_dir)
        claims = (data or {}).get("results", {}).get("claims")
        if claims is None:
            if cid in CLAIMLESS:
                continue
            runs.append({"chapter": title, "recorded": "not run at this profile", "vfnb": "",
                         "command": f"python -m vfnb run {Path(page).stem} --profile {cfg.profile}"})
            continue
        runs.append({"chapter": title, "recorded": data.get("written", "?"), "vfnb": data.get("vfnb", "?"),
                     "command": f"python -m vfnb run {Path(page).stem} --profile {cfg.profile}"})
        for c in claims:
            rows.append({"chapter": title, "page": page, "claim": c["claim"], "paper": c.get("paper", ""),
                         "this run": c["evidence"], "verdict": VERDICTS.get(c["holds here"], c["holds here"])})
    return rows, runs


#: Chapters without a claims table of their own (they introduce the paper or its setup, or show committed sweeps).
CLAIMLESS = frozenset({"introduction", "experimental_setup", "reproduction"})


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How many claims hold, do not hold, or are not shown at this scale, per chapter and in all."""
    out = []
    for title in dict.fromkeys(r["chapter"] for r in rows):
        own = [r for r in rows if r["chapter"] == title]
        out.append({"chapter": title, **{v: sum(r["verdict"] == v for r in own) for v in VERDICTS.values()}})
    if out:
        out.append({"chapter": "all chapters", **{v: sum(r[v] for r in out) for v in VERDICTS.values()}})
    return out


def claims_html(rows: list[dict[str, Any]]):
    """The gathered claims as one HTML table (:func:`vfnb.plots.html_table`): the chapter links to its page, the
    verdict carries its colour."""
    from IPython.display import HTML

    from ..plots import html_table
    if not rows:
        return HTML("<p><em>No chapter has recorded claims at this profile yet.</em></p>")
    cells = [{"chapter": f'<a href="{html.escape(r["page"])}">{html.escape(r["chapter"])}</a>',
              "claim": r["claim"], "paper": r["paper"] or "—", "this run": r["this run"],
              "verdict": f'<span style="color:{VERDICT_COLORS.get(r["verdict"], "inherit")}">'
                         f'{html.escape(r["verdict"])}</span>'} for r in rows]
    return HTML(html_table(cells, raw=("chapter", "verdict")))


def where(cfg: Config) -> Path:
    """The folder the results are read from (for the page's provenance line)."""
    return results_root(cfg.results_dir) / cfg.profile


#: One colour per verdict (the same as the claims table's).
VERDICT_COLORS = {"holds": "#1e8449", "does not hold": "#c0392b", "not shown at this scale": "#95a5a6"}


def plot_summary(ax, rows: list[dict[str, Any]]) -> None:
    """The verdicts per chapter as stacked horizontal bars (chapters top to bottom in reading order)."""
    counts = [r for r in summary(rows) if r["chapter"] != "all chapters"]
    if not counts:
        ax.text(0.5, 0.5, "no chapter has recorded claims at this profile yet", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels = [r["chapter"] if len(r["chapter"]) <= 40 else r["chapter"][:38] + "…" for r in counts]
    y = list(range(len(counts)))[::-1]
    left = [0] * len(counts)
    for verdict, color in VERDICT_COLORS.items():
        n = [r[verdict] for r in counts]
        ax.barh(y, n, left=left, color=color, label=verdict)
        left = [a + b for a, b in zip(left, n)]
    ax.set_yticks(y, labels)
    ax.set_xlabel("claims")
    ax.set_title("Verdicts per chapter")
    ax.legend(loc="lower right")
