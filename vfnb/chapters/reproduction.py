"""Paper §5.3–5.4, reproduced: the headline tables over three seed pairs, from sweeps committed under ``results/``,
next to the paper's Tables 1 and 7.

The sweeps are ``vfnb sweep`` outputs (one row per seed pair, mean ± std, provenance); nothing on the page is typed by
hand except the paper's numbers, transcribed once below from its full text.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import plots
from ..config import Config

#: Where committed sweep results live: ``results/<profile>/<chapter stem>/`` beside the package (a source checkout).
RESULTS = Path(__file__).resolve().parents[2] / "results"
#: The sweeps this page shows, in reading order: chapter stem -> what it is.
SWEEPS = {"05_3_enhanced_normalization": "§5.3: accuracy of the merged model at α = 0.5 per post-merging method",
          "05_4_preserve_first_merging": "§5.4: Table 1 (VGG16) and appendix Table 7 (ResNet20-BN), PFM at α = 0.5"}
#: The seed pairs of every committed sweep (the paper's tables average over several pairs too).
SEED_GRID = "[[0, 1], [2, 3], [4, 5]]"

#: Paper Table 1 (VGG16, CIFAR-10, α = 0.5, activation matching), mean and std in %, as printed in the paper's full
#: text (columns: direct merging; AM without normalization, + REPAIR, + RESCALE, + bias calibration).
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "Model 1": {"Direct": (91.88, 0.02)},
    "Model 2": {"Direct": (91.67, 0.21)},
    "Ensemble": {"Direct": (92.93, 0.29)},
    "PFM 0/14": {"Direct": (10.00, 0.00), "AM no normalization": (46.50, 1.59), "AM REPAIR": (39.09, 4.42),
                 "AM RESCALE": (84.68, 0.85), "AM bias calibration": (82.94, 1.41)},
    "PFM 3/14": {"Direct": (10.03, 0.05), "AM no normalization": (62.40, 0.64), "AM REPAIR": (39.97, 2.55),
                 "AM RESCALE": (86.77, 0.06), "AM bias calibration": (85.53, 0.16)},
    "PFM 6/14": {"Direct": (10.92, 0.38), "AM no normalization": (85.81, 0.40), "AM REPAIR": (50.61, 2.13),
                 "AM RESCALE": (90.88, 0.27), "AM bias calibration": (90.03, 0.32)},
    "PFM 8/14": {"Direct": (26.35, 6.54), "AM no normalization": (91.15, 0.13), "AM REPAIR": (87.37, 1.73),
                 "AM RESCALE": (92.43, 0.23), "AM bias calibration": (91.84, 0.05)},
    "PFM 12/14": {"Direct": (92.88, 0.23), "AM no normalization": (92.88, 0.16), "AM REPAIR": (92.85, 0.15),
                  "AM RESCALE": (92.87, 0.21), "AM bias calibration": (92.71, 0.15)},
}
#: Paper appendix Table 7 (ResNet20, CIFAR-10, α = 0.5), the activation-matching columns, mean and std in %.
PAPER_TABLE7: dict[str, dict[str, tuple[float, float]]] = {
    "Model 1": {"Direct": (91.85, 0.25)},
    "Model 2": {"Direct": (91.79, 0.20)},
    "Ensemble": {"Direct": (93.08, 0.21)},
    "PFM 0/20": {"Direct": (9.73, 0.47), "AM no normalization": (11.65, 2.36), "AM RESET": (64.12, 0.33)},
    "PFM 6/20": {"Direct": (9.02, 1.70), "AM no normalization": (13.57, 3.58), "AM RESET": (68.33, 0.52)},
    "PFM 10/20": {"Direct": (10.33, 0.51), "AM no normalization": (32.10, 6.39), "AM RESET": (72.71, 0.73)},
    "PFM 13/20": {"Direct": (10.27, 0.35), "AM no normalization": (52.57, 5.81), "AM RESET": (76.76, 0.99)},
    "PFM 19/20": {"Direct": (92.01, 0.35), "AM no normalization": (93.05, 0.14), "AM RESET": (93.10, 0.16)},
}
PAPER_TABLES = {"table1": PAPER_TABLE1, "table7": PAPER_TABLE7}


@dataclass
class Sweep:
    """One committed sweep: its folder, what was run (``sweep.json``), one row per point (``results.csv``) and the
    mean ± std over seeds (``summary.csv``), all as ``vfnb sweep`` wrote them."""

    stem: str
    profile: str
    folder: Path
    spec: dict[str, Any]
    rows: list[dict[str, str]]
    summary: list[dict[str, Any]]
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> int:
        return sum(r["status"] == "done" for r in self.rows)

    def cells(self, table: str) -> dict[tuple[str, str], dict[str, Any]]:
        """``(row, column)`` -> the summary entry (mean, std, n, percent) of one recorded table. The page shows sweeps
        over seeds only: a sweep whose points differ in anything else is refused, not mixed."""
        groups = {s["group"] for s in self.summary}
        if len(groups) > 1:
            raise ValueError(f"{self.folder} varies more than the seeds ({'; '.join(sorted(groups))}); the "
                             "reproduction page averages over seeds only")
        return {(s["row"], s["column"]): s for s in self.summary if s["table"] == table}

    def setting(self) -> dict[str, Any]:
        """The full parameters one finished point ran with (from its recorded results): dataset, widths, n_test..."""
        for sidecar in sorted(self.folder.glob("points/*/results/*/*.json")):
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            if data.get("parameters"):
                return data["parameters"]
        return {}

    def n_test(self) -> int | None:
        """How many test images each accuracy was measured on (``n_test``, else the dataset's whole test split)."""
        if "n_test" not in self._memo:  # label(), notes() and the figures ask; the dataset is loaded once
            p = self.setting()
            try:
                from ..data import load_dataset
                self._memo["n_test"] = int(p["n_test"]) if p.get("n_test") else len(
                    load_dataset(p["dataset"], "test", root=p.get("data_root")))
            except Exception:  # noqa: BLE001 -- e.g. CIFAR-10 files absent here: the page then omits the figure
                self._memo["n_test"] = None
        return self._memo["n_test"]

    def label(self) -> str:
        """This sweep's scale in a few words, e.g. ``mnist5k, VGG16 ×0.25, 500 test images``."""
        p = self.setting()
        parts = [str(p.get("dataset", self.profile))]
        if p.get("model"):
            parts.append(f"{p['model'].upper()} ×{p.get('model_width', 1):g}")
        if self.n_test():
            parts.append(f"{self.n_test()} test images")
        return ", ".join(parts)

    def paper_claims(self) -> dict[str, str]:
        """Each claim's "paper" entry (the paper's own figure for it), from a finished point's recorded claims."""
        for sidecar in sorted(self.folder.glob("points/*/results/*/*.json")):
            rows = json.loads(sidecar.read_text(encoding="utf-8")).get("results", {}).get("claims")
            if rows:
                return {r["claim"]: r.get("paper", "") for r in rows}
        return {}


def command(stem: str, profile: str) -> str:
    """The exact command that produces (or resumes) the committed sweep of ``stem`` at ``profile``."""
    return f"vfnb sweep {stem} --profile {profile} -g seeds='{SEED_GRID}' --out results/{profile}/{stem}"


def load_sweep(stem: str, profile: str, root: str | Path | None = None) -> Sweep | None:
    """The committed sweep of ``stem`` at ``profile`` (``None`` if it has not been run and committed)."""
    folder = Path(root or RESULTS) / profile / stem
    if not (folder / "sweep.json").is_file() or not (folder / "results.csv").is_file():
        return None
    spec = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    with open(folder / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    summary = []
    if (folder / "summary.csv").is_file():
        with open(folder / "summary.csv", newline="", encoding="utf-8") as fh:
            for s in csv.DictReader(fh):
                for k in ("mean", "std"):
                    s[k] = float(s[k]) if s.get(k) not in (None, "") else None
                s["n"] = int(s["n"])
                s["percent"] = s.get("percent", "True") in ("True", "true", "1")
                summary.append(s)
    return Sweep(stem, profile, folder, spec, rows, summary)


def sweeps(cfg: Config) -> dict[str, Sweep | None]:
    """Every sweep of :data:`SWEEPS` at the page's profile, from ``cfg.sweeps_dir`` (default :data:`RESULTS`)."""
    return {stem: load_sweep(stem, cfg.profile, cfg.sweeps_dir) for stem in SWEEPS}


def provenance_table(found: dict[str, Sweep | None], profile: str) -> list[dict[str, str]]:
    """Where each committed result comes from: chapter, points finished, seed pairs, each pair's wall time (a pair
    whose edge models were not in the zoo includes their training), the commits and devices the points ran on (``+``: the tree had uncommitted changes), the dates of the sweep's calls and its command; a sweep
    not committed yet is listed with the command that produces it."""
    rows = []
    for stem, sw in found.items():
        if sw is None:
            rows.append({"chapter": stem, "points": "not run", "seed pairs": "", "minutes per pair": "", "commit": "",
                         "device": "", "dates": "", "command": f"`{command(stem, profile)}`"})
            continue
        done = [r for r in sw.rows if r["status"] == "done"]
        runs = sw.spec.get("runs") or [sw.spec.get("provenance") or {}]
        dates = sorted({(r.get("date") or "")[:10] for r in runs if r.get("points run", 1)} - {""})
        rows.append({"chapter": stem, "points": f"{sw.done}/{len(sw.rows)} done",
                     "seed pairs": ", ".join(sorted({r.get("seeds", "") for r in done})),
                     "minutes per pair": ", ".join(f"{float(r['seconds']) / 60:.1f}" for r in done if r.get("seconds")),
                     "commit": ", ".join(sorted({r.get("commit", "")[:10] for r in done} - {""})) or "unknown",
                     "device": ", ".join(sorted({r.get("device", "") for r in done} - {""})) or "unknown",
                     "dates": " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "",
                     "command": f"`{command(stem, profile)}`"})
    return rows


def _pm(mean: float, std: float, n: int | None = None) -> str:
    return f"{mean:.2f} ± {std:.2f}" + (f" (n={n})" if n is not None else "")


def _cell(s: dict[str, Any] | None) -> str:
    """A summary entry as ``mean ± std`` (in % for a table recorded with ``percent``)."""
    if not s or s["mean"] is None:
        return ""
    scale = 100 if s.get("percent", True) else 1
    return _pm(scale * s["mean"], scale * s["std"])


def comparison_table(sw: Sweep, table: str) -> list[dict[str, str]]:
    """A recorded table's mean ± std over seed pairs (in %) beside the paper's cell, row by row: for every column
    ``<column>`` (here) and ``<column>, paper``."""
    cells = sw.cells(table)
    paper = PAPER_TABLES.get(table, {})
    labels = list(dict.fromkeys(r for r, _ in cells))
    columns = list(dict.fromkeys(c for _, c in cells))
    out = []
    for label in labels:
        row = {"Model": label}
        for col in columns:
            s = cells.get((label, col))
            row[col] = _cell(s)
            ref = paper.get(label, {}).get(col)
            if paper:
                row[f"{col}, paper"] = _pm(*ref) if ref else ""
        out.append(row)
    n = max((s["n"] for s in cells.values()), default=0)
    return [{**r, "n": str(n)} for r in out]


def summary_table(sw: Sweep, table: str) -> list[dict[str, str]]:
    """A recorded table's mean ± std over seed pairs, in %, in the chapter's layout (no paper numbers exist for it)."""
    cells = sw.cells(table)
    out: dict[str, dict[str, str]] = {}
    for (label, col), s in cells.items():
        out.setdefault(label, {"": label})[col] = _cell(s)
    columns = list(dict.fromkeys(c for r in out.values() for c in r))
    n = max((s["n"] for s in cells.values()), default=0)
    return [{**{c: r.get(c, "") for c in columns}, "n": str(n)} for r in out.values()]


def claims_table(sw: Sweep) -> list[dict[str, str]]:
    """Each claim the chapter tests, how often it held over the seed pairs (e.g. ``yes ×3``; *within noise*: the
    difference was inside the test set's noise), and the paper's own figure for it where the chapter gives one."""
    paper = sw.paper_claims()
    return [{"claim": s["row"], "holds here (per seed pair)": s.get("values", ""),
             **({"paper": paper.get(s["row"], "")} if any(paper.values()) else {})}
            for s in sw.summary if s["table"] == "claims"]


def _layers(label: str) -> int | None:
    head = label.removeprefix("PFM ").split("/")[0]
    return int(head) if label.startswith("PFM ") and head.isdigit() else None


def plot_pfm(ax, sw: Sweep, table: str, columns: Sequence[str]) -> None:
    """Headline figure of a PFM table: accuracy (%) over the number of preserved layers l, mean ± std over seed pairs
    (solid, error bars) and the paper's (dashed, from :data:`PAPER_TABLES`), one colour per column. The legend names
    both datasets: the two are not the same experiment at the same scale."""
    cells = sw.cells(table)
    paper = PAPER_TABLES.get(table, {})
    here = sw.label().split(",")[0]
    labels = [r for r in dict.fromkeys(r for r, _ in cells) if _layers(r) is not None]
    L = labels[0].split("/")[1] if labels else "L"
    for col in columns:
        colour = plots.color("activation matching" if col == "AM no normalization" else col.removeprefix("AM "),
                             fallback=len(ax.lines))
        pts = [(_layers(r), cells[(r, col)]) for r in labels if (r, col) in cells and cells[(r, col)]["mean"] is not None]
        if pts:
            x = [p[0] for p in pts]
            ax.errorbar(x, [100 * p[1]["mean"] for p in pts], yerr=[100 * p[1]["std"] for p in pts], marker="o",
                        capsize=3, color=colour, label=f"{col}, here ({here})")
        ref = [(_layers(r), paper[r][col]) for r in paper if _layers(r) is not None and col in paper[r]]
        if ref:
            ax.errorbar([p[0] for p in ref], [p[1][0] for p in ref], yerr=[p[1][1] for p in ref], marker="s",
                        linestyle="--", capsize=3, color=colour, alpha=0.7, label=f"{col}, paper (CIFAR-10)")
    ax.set_xlabel(f"preserved layers l (of {L})")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize="small")


def edge_mean(sw: Sweep, table: str) -> float | None:
    """The edge models' mean accuracy (in %) over the sweep's points (rows Model 1 and Model 2 of a PFM table)."""
    cells = sw.cells(table)
    values = [cells[(m, "Direct")]["mean"] for m in ("Model 1", "Model 2") if (m, "Direct") in cells]
    return 100 * float(np.mean(values)) if values else None


def status(found: dict[str, Sweep | None], profile: str, paper_found: dict[str, Sweep | None]) -> str:
    """What this page shows and what it does not: which sweeps are committed at ``profile``, and whether the paper
    scale has been run (it needs a GPU), with the exact commands."""
    have = [s for s, sw in found.items() if sw is not None]
    lines = []
    if have:
        lines.append(f"This page shows the committed `{profile}` sweeps of {', '.join(have)}."
                     + (" At `smoke` (one epoch on 512 digits) the numbers only check that the sweeps and this page "
                        "work; the `cpu` page is the one to read." if profile == "smoke" else ""))
    missing = [s for s, sw in found.items() if sw is None]
    if missing:
        lines.append(f"Not committed at `{profile}` yet: {', '.join(missing)}; run " +
                     "; ".join(f"`{command(s, profile)}`" for s in missing) + ", then commit `results/`.")
    if any(sw is None for sw in paper_found.values()):
        lines.append("**The paper scale has not been run.** The `paper` profile (CIFAR-10, the paper's widths and "
                     "epochs) needs a GPU; on a machine with one and the CIFAR-10 files, run "
                     + "; ".join(f"`{command(s, 'paper')} -p data_root DIR`" for s, sw in paper_found.items()
                                 if sw is None)
                     + " and commit `results/paper/`; this page then shows those tables too.")
    return "\n\n".join(lines)


def _above_edges(cells: dict[tuple[str, str], Any], edges: float, get) -> list[str]:
    """Rows whose best column is above ``edges`` (%)."""
    rows = []
    for label in dict.fromkeys(r for r, _ in cells):
        if _layers(label) is None:
            continue
        best = max(((col, get(label, col)) for (r, col) in cells if r == label and get(label, col) is not None),
                   key=lambda t: t[1], default=None)
        if best and best[1] > edges:
            rows.append(f"{label} ({best[0]} {best[1]:.2f} %)")
    return rows


def notes(found: dict[str, Sweep | None]) -> str:
    """What the committed numbers show, computed from them: the spread over seed pairs (and how much of it the test
    set's sampling explains), and for Table 1 and Table 7 the PFM rows whose best column beats the edge models' mean,
    here and in the paper."""
    lines = []
    for stem, sw in found.items():
        if sw is None or not sw.summary:
            continue
        numeric = [s for s in sw.summary if s["mean"] is not None and s.get("percent", True)]
        if numeric:
            widest = max(numeric, key=lambda s: s["std"])
            n_test = sw.n_test()
            typical = float(np.median([s["mean"] for s in numeric]))
            noise = ""
            if n_test:
                se = 100 * np.sqrt(typical * (1 - typical) / n_test)
                verdict = ("so a spread of that size can come from test-set sampling alone"
                           if 100 * widest["std"] <= 2 * se else
                           "so that spread is far beyond test-set sampling: the seed pairs differ")
                noise = (f" One accuracy measured on {n_test} test images has a standard error of about {se:.2f} "
                         f"points near {100 * typical:.0f} %, {verdict}.")
            lines.append(f"**{stem}** ({sw.done} seed pairs; {sw.label()}): the largest spread between pairs is "
                         f"{100 * widest['std']:.2f} points ({widest['table']}, {widest['row']}, {widest['column']}: "
                         f"{100 * widest['mean']:.2f} ± {100 * widest['std']:.2f} %).{noise}")
        for table, paper in PAPER_TABLES.items():
            cells = sw.cells(table)
            if not cells:
                continue
            here_edges = edge_mean(sw, table)
            paper_edges = float(np.mean([paper[m]["Direct"][0] for m in ("Model 1", "Model 2")]))
            here = _above_edges(cells, here_edges,
                                lambda r, c: 100 * cells[(r, c)]["mean"] if cells[(r, c)]["mean"] is not None else None)
            there = _above_edges({(r, c): v for r in paper for c, v in paper[r].items()}, paper_edges,
                                 lambda r, c: paper[r][c][0])
            lines.append(f"{table.replace('table', 'Table ')}: the edge models average {here_edges:.2f} % here "
                         f"({sw.label().split(',')[0]}) and {paper_edges:.2f} % in the paper (CIFAR-10, full width); "
                         f"the comparison is of shapes, not of levels. Rows whose best merge beats the edges' average "
                         f"here: {', '.join(here) or 'none'}; in the paper: {', '.join(there) or 'none'}.")
    return "\n\n".join(lines) or "*No sweep is committed at this profile.*"
