"""Machine-readable results of chapter runs: one JSON sidecar per chapter and profile.

``<results>/<profile>/<chapter>.json`` holds the chapter's parameters, provenance (vfnb version, time) and named
results (e.g. its claims table). ``<results>`` is ``results_dir``, else ``$VFNB_RESULTS``, else
``~/.cache/vfnb/results``; ``vfnb book`` points it into its output folder, so the conclusion page of a build reads
exactly that build's chapters. Writes are atomic; values are JSON (numpy scalars and arrays are converted).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .config import Config
from .train import atomic_save


def results_root(results_dir: str | os.PathLike | None = None) -> Path:
    """Where results live: the argument, else ``$VFNB_RESULTS``, else ``~/.cache/vfnb/results``."""
    if results_dir is not None:
        return Path(results_dir).expanduser()
    env = os.environ.get("VFNB_RESULTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vfnb" / "results"


def sidecar(chapter: str, profile: str, results_dir: str | os.PathLike | None = None) -> Path:
    """The JSON file of ``chapter``'s results at ``profile``."""
    return results_root(results_dir) / profile / f"{chapter}.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"results must be JSON data (numbers, strings, lists, dicts, numpy arrays); got "
                    f"{type(value).__name__}: convert it before recording")


#: Parameters that say where a run happened, not what it computed: a change of them keeps earlier results.
RUNTIME = ("device", "cache_dir", "data_root")


def _science(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in RUNTIME}


def record(cfg: Config, name: str, value: Any, results_dir: str | os.PathLike | None = None) -> Path:
    """Store ``value`` as result ``name`` of ``cfg``'s chapter (replacing an earlier one of that name) and
    return the sidecar's path. The file also records the chapter's parameters, the vfnb version and the time."""
    from . import __version__
    if not isinstance(name, str) or not name:
        raise ValueError(f"a result needs a non-empty name, got {name!r}")
    path = sidecar(cfg.experiment, cfg.profile, results_dir)
    data = load(cfg.experiment, cfg.profile, results_dir) or {}
    if _science(data.get("parameters") or {}) != _science(_jsonable(dict(cfg))):
        data = {}  # another parameter set: earlier results do not belong to this run
    data.update({"chapter": cfg.experiment, "profile": cfg.profile, "parameters": _jsonable(dict(cfg)),
                 "vfnb": __version__, "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    data.setdefault("results", {})[name] = _jsonable(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(json.dumps(data, indent=1, ensure_ascii=False), path,
                saver=lambda text, p: Path(p).write_text(text, encoding="utf-8"))
    return path


def load(chapter: str, profile: str, results_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The sidecar of ``chapter`` at ``profile`` (``None`` if that chapter has not recorded anything there).
    A file that is not valid JSON raises ``ValueError`` naming it."""
    path = sidecar(chapter, profile, results_dir)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"results file {path} is not valid JSON ({exc}); delete it and re-run the chapter") from exc


#: The key under which :func:`record_table` stores a table in a sidecar's results.
TABLE_KIND = "table"


def record_table(cfg: Config, name: str, rows: list[dict[str, Any]], index: str | list[str], percent: bool = True,
                 results_dir: str | os.PathLike | None = None) -> Path:
    """Record a table of headline numbers as result ``name``: ``rows`` of dicts whose ``index`` column(s) label
    the row (strings) and whose other columns are numbers (``None`` for an empty cell). ``percent``: the numbers are
    fractions shown in % (accuracies, the paper's unit). ``vfnb sweep`` gathers every recorded table into
    ``results.csv`` and averages it over seeds in the same layout (:mod:`vfnb.sweep`)."""
    keys = [index] if isinstance(index, str) else list(index)
    if not keys:
        raise ValueError("a recorded table needs at least one index column that labels its rows")
    clean = []
    for r in rows:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"table {name!r}: a row lacks the index column(s) {', '.join(missing)}: {r}")
        row = {k: str(r[k]) for k in keys}
        for col, v in r.items():
            if col in keys:
                continue
            if v is not None and not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
                raise ValueError(f"table {name!r}: column {col!r} holds {v!r}; recorded tables hold numbers "
                                 f"(format them only for display), or name the column in index=")
            row[col] = None if v is None else float(v)
        clean.append(row)
    labels = [tuple(r[k] for k in keys) for r in clean]
    if len(set(labels)) != len(labels):
        raise ValueError(f"table {name!r}: two rows have the same label in {keys}; labels must be unique")
    return record(cfg, name, {"kind": TABLE_KIND, "index": keys, "percent": bool(percent), "rows": clean}, results_dir)


def table(cfg: Config, name: str, rows: list[dict[str, Any]], index: str | list[str], percent: bool = True,
          results_dir: str | os.PathLike | None = None, **display: Any):
    """:func:`record_table`, then return :func:`vfnb.plots.table` of ``rows`` (``display``: its keyword arguments),
    so that a chapter records exactly the numbers it shows."""
    from .plots import table as show
    record_table(cfg, name, rows, index, percent, results_dir)
    return show(rows, **display)


def tables(data: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The tables (:func:`record_table`) in a loaded sidecar: name -> ``{"index": [...], "rows": [...]}``."""
    found = (data or {}).get("results", {})
    return {k: v for k, v in found.items() if isinstance(v, dict) and v.get("kind") == TABLE_KIND}


# --------------------------------------------------------------------------- many runs: cells and mean ± std
#: Parameters whose values are the random seeds: :func:`summarize` averages over them (every other parameter, except
#: the runtime ones, identifies a group).
SEED_PARAMS = ("seeds", "seed")
#: Parameters that say where a run happened, not what it computed (ignored for grouping).
RUNTIME_PARAMS = RUNTIME


def describe(params: Mapping[str, Any]) -> str:
    """``name=value, ...`` (a group of runs, a grid point) for tables and messages."""
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(defaults)"


def cells(data: dict[str, Any] | None) -> dict[str, Any]:
    """Every cell of every recorded table of one run (a loaded sidecar), ``"<table>: <row> | <column>"`` -> number, and the verdict of
    each claim of its claims table (:func:`vfnb.chapters.claims.show`), ``"claims: <claim> | holds here"`` -> text."""
    out: dict[str, Any] = {}
    for name, tab in tables(data).items():
        for row in tab["rows"]:
            label = " / ".join(row[k] for k in tab["index"])
            for col, value in row.items():
                if col not in tab["index"]:
                    out[f"{name}: {label} | {col}"] = value
    for row in (data or {}).get("results", {}).get("claims") or []:
        out[f"claims: {row['claim']} | holds here"] = row["holds here"]
    return out


def summarize(rows: Sequence[Mapping[str, Any]], param_names: Sequence[str]) -> list[dict[str, Any]]:
    """Mean ± std (numpy's ``std``, ddof 0, as the chapters' own tables) of every recorded cell over the finished
    points that share every non-seed parameter: long-form rows ``group``, ``table``, ``row``, ``column``, ``mean``,
    ``std``, ``n``."""
    keys = [n for n in param_names if n not in SEED_PARAMS and n not in RUNTIME_PARAMS]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for gkey, members in groups.items():
        cells = list(dict.fromkeys(c for m in members for c in m if ": " in c and " | " in c
                                   and c not in param_names))
        for cell in cells:
            values = [m[cell] for m in members if m.get(cell) not in (None, "")]
            if not values:
                continue
            name, rest = cell.split(": ", 1)
            label, column = rest.rsplit(" | ", 1)
            entry = {"group": describe(dict(zip(keys, gkey))), **dict(zip(keys, gkey)), "table": name,
                     "row": label, "column": column, "n": len(values)}
            if all(isinstance(v, (int, float)) for v in values):
                entry.update(mean=float(np.mean(values)), std=float(np.std(values)), values="")
            else:  # verdicts: how often each occurred
                counts = {v: values.count(v) for v in dict.fromkeys(values)}
                entry.update(mean=None, std=None, values=", ".join(f"{v} ×{c}" for v, c in counts.items()))
            out.append(entry)
    return out


def summary_tables(summary: Sequence[Mapping[str, Any]], percent: Iterable[str] = ()
                   ) -> dict[tuple[str, str], list[dict[str, str]]]:
    """The summary in each recorded table's own layout: ``(group, table)`` -> rows of ``mean ± std`` cells (in % for
    the tables named in ``percent``, the paper's unit for accuracies), ``n`` in the last column."""
    percent = set(percent)
    out: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    counts: dict[tuple[str, str, str], int] = {}
    for s in summary:
        rows = out.setdefault((s["group"], s["table"]), {})
        row = rows.setdefault(s["row"], {"": s["row"]})
        if s["mean"] is None:
            row[s["column"]] = s["values"]
        elif s["table"] in percent:
            row[s["column"]] = f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
        else:
            row[s["column"]] = f"{s['mean']:.4g} ± {s['std']:.2g}"
        counts[(s["group"], s["table"], s["row"])] = max(counts.get((s["group"], s["table"], s["row"]), 0), s["n"])
    tables_out = {}
    for k, rows in out.items():
        columns = list(dict.fromkeys(c for r in rows.values() for c in r))  # every row gets every column, n last
        tables_out[k] = [{**{c: r.get(c, "") for c in columns}, "n": str(counts[(k[0], k[1], label)])}
                         for label, r in rows.items()]
    return tables_out


