"""Sweeps: a grid of parameter sets of one chapter, each point a papermill run (the path of ``vfnb run``), executed
on Dask distributed, gathered into one table and averaged over seeds in the paper's table layout.

``vfnb sweep CHAPTER -g seeds='[[0, 1], [2, 3], [4, 5]]' --out DIR`` (or :func:`sweep` in Python) writes into ``DIR``:

- ``points/<id>/chapter.ipynb``: the executed notebook of one point; ``points/<id>/results/``: what the chapter
  recorded (:mod:`vfnb.results`); ``points/<id>/point.json``: its parameters, status (``done``/``failed``), error,
  time and worker; ``points/<id>/run.log``: what its kernel printed; ``points/<id>/failed.ipynb``: the notebook of
  a failed point, up to its error. ``<id>`` is a hash of the point's parameters, so a point keeps its folder when the grid grows.
- ``results.csv`` and ``results.parquet``: one row per point, the parameters as columns (lists as JSON text), then
  ``status``, ``seconds``, ``error`` and one column per cell of every table the chapter recorded
  (:func:`vfnb.results.record_table`), named ``<table>: <row> | <column>``.
- ``summary.csv`` (long form) and ``summary.md`` (the recorded tables, each cell ``mean ± std (n)`` over the
  points that differ only in their seeds); ``sweep.json``: what was run, where, by which command and commit.

Nothing is lost when a sweep is interrupted or a worker dies: a point's notebook and results are written to
temporary names and moved into place when it finishes, and its ``point.json`` is written last, so a rerun skips
exactly the finished points (failed ones run again). Dask re-runs the point of a worker that died on another
worker. Every file is written atomically.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import yaml

from . import book
from .config import ConfigError
from .results import cells, describe, load, summarize, summary_tables, tables
from .train import atomic_save

#: Fixed columns of results.csv after the parameters.
STATUS_COLUMNS = ("point", "status", "seconds", "worker", "error")
POINT_FILE = "point.json"
NOTEBOOK = "chapter.ipynb"
#: The executed notebook of a point that failed, up to its error.
FAILED_NOTEBOOK = "failed.ipynb"
#: The point's log: what its kernel wrote to the terminal (training progress, warnings).
LOG = "run.log"


class StalePointsWarning(UserWarning):
    """Finished points of a sweep were computed by another version of the chapter or library (kept, not rerun)."""


class SweepError(ConfigError):
    """A sweep that cannot start: a bad grid, a bad value at some point, or an unusable output folder."""


# --------------------------------------------------------------------------- the grid
def parse_axis(text: str) -> tuple[str, list[Any]]:
    """One ``-g NAME=[v1, v2]`` option: the name and its list of values (typed like ``-p``)."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.isidentifier():
        raise SweepError(f"grid option {text!r} is not NAME=[v1, v2, ...]; e.g. -g alpha='[0.25, 0.5]'")
    value = book.parse_value(values)
    if not isinstance(value, list) or not value:
        raise SweepError(f"grid option {name}={values.strip()!r} needs a non-empty list of values, e.g. "
                         f"{name}='[{values.strip()}, ...]'; a single value is a fixed parameter: -p {name} {values.strip()}")
    return name, value


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep file (YAML): ``grid`` (name -> list; the product is taken), optional ``points`` (a list of parameter
    dicts, each combined with every grid combination), ``parameters`` (fixed), and optional ``chapter``,
    ``profile``."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"cannot read the sweep file {path}: {exc}") from exc
    if not isinstance(spec, dict):
        raise SweepError(f"the sweep file {path} must be a mapping with keys grid, points, parameters, chapter, profile")
    unknown = sorted(set(spec) - {"grid", "points", "parameters", "chapter", "profile"})
    if unknown:
        raise SweepError(f"the sweep file {path} has unknown key(s) {', '.join(unknown)}; "
                         f"allowed: grid, points, parameters, chapter, profile")
    for key, kind in (("grid", dict), ("parameters", dict), ("points", list)):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise SweepError(f"{key!r} in {path} must be a {'mapping' if kind is dict else 'list'}")
    for name, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid axis {name!r} in {path} must be a non-empty list of values, got {values!r}")
    if any(not isinstance(p, dict) for p in spec.get("points") or []):
        raise SweepError(f"every entry of 'points' in {path} must be a mapping of parameters")
    return spec


def expand(grid: Mapping[str, Sequence[Any]] | None = None, parameters: Mapping[str, Any] | None = None,
           points: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The parameter sets of a sweep: every combination of the ``grid`` axes (in the order given; the last varies
    fastest), times each of ``points``, each on top of the fixed ``parameters``. A name given twice is an error."""
    grid = dict(grid or {})
    fixed = dict(parameters or {})
    both = sorted(set(grid) & set(fixed))
    if both:
        raise SweepError(f"parameter(s) {', '.join(both)} are both fixed (-p) and swept (-g); give each once")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    extra = [dict(p) for p in points] if points else [{}]
    out = []
    for combo in combos:
        for p in extra:
            clash = sorted((set(p) & set(combo)) | (set(p) & set(fixed)))
            if clash:
                raise SweepError(f"parameter(s) {', '.join(clash)} are set both by a point and by the grid or "
                                 f"the fixed parameters")
            out.append({**fixed, **combo, **p})
    seen: dict[str, int] = {}
    for i, params in enumerate(out):
        pid = point_id(params)
        if pid in seen:
            raise SweepError(f"grid points {seen[pid]} and {i} are the same parameter set {describe(params)}")
        seen[pid] = i
    return out


def point_id(params: Mapping[str, Any]) -> str:
    """A point's folder name: a hash of its parameters (stable across runs and grid orders)."""
    text = json.dumps(dict(params), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def validate(chapter: Path, points: Sequence[Mapping[str, Any]]) -> None:
    """Check every point before anything runs (:func:`vfnb.book.validate_run`, so the messages are those of
    ``vfnb run``); raise :class:`SweepError` listing every point that fails."""
    problems = []
    for i, params in enumerate(points):
        try:
            book.validate_run(chapter, params)
        except (book.BookError, ConfigError) as exc:
            problems.append(f"grid point {i} ({describe(params)}): {exc}")
    if problems:
        raise SweepError("nothing was run; fix these grid points first:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- one point (runs on a worker)
def _read_point(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / POINT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def finished(folder: Path, params: Mapping[str, Any]) -> bool:
    """Whether the point in ``folder`` ran to the end with exactly these parameters."""
    info = _read_point(folder)
    return bool(info and info.get("status") == "done" and info.get("parameters") == json.loads(
        json.dumps(dict(params), default=str)) and (folder / NOTEBOOK).is_file())


def _write_json(data: Any, path: Path) -> None:
    atomic_save(json.dumps(data, indent=1, default=str, ensure_ascii=False), path,
                saver=lambda text, p: Path(p).write_text(text, encoding="utf-8"))


def run_point(chapter: str, params: dict[str, Any], folder: str, threads: int | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Execute one point of a sweep into ``folder`` and return its ``point.json`` record. A failing notebook is
    recorded (``status: failed`` with the error), not raised, so the other points go on. Runs on a Dask worker."""
    folder = Path(folder)
    if finished(folder, params):  # e.g. re-submitted after its first worker died at the very end
        return _read_point(folder)  # type: ignore[return-value]
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".partial-*"):  # left by a run that was killed
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    token = uuid.uuid4().hex[:8]
    partial_nb = folder / f".partial-{token}.ipynb"
    partial_results = folder / f".partial-{token}-results"
    env = {"VFNB_RESULTS": str(partial_results)}
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    info: dict[str, Any] = {"parameters": json.loads(json.dumps(params, default=str)), "chapter": str(chapter),
                            "code": book.run_key(Path(chapter), params),  # notebook + parameters + library source
                            "worker": f"{socket.gethostname()}:{os.getpid()}",
                            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    start = time.perf_counter()
    log = folder / LOG
    try:
        with _output_to(log):  # the kernel's own messages go to the point's log, not over the sweep's progress bar
            book.run_chapter(chapter, params, output_path=partial_nb, progress=progress, env=env)
    except Exception as exc:  # noqa: BLE001 -- a failing point is data, reported with its error
        info.update(status="failed", error=_error_text(exc), seconds=round(time.perf_counter() - start, 2))
        if partial_nb.exists():  # the notebook as far as it ran, with the traceback, for the reader to open
            os.replace(partial_nb, folder / FAILED_NOTEBOOK)
        _write_json(info, folder / POINT_FILE)
        return info
    results = folder / "results"
    if results.exists():
        shutil.rmtree(results)
    if partial_results.exists():
        os.replace(partial_results, results)
    os.replace(partial_nb, folder / NOTEBOOK)
    (folder / FAILED_NOTEBOOK).unlink(missing_ok=True)
    info.update(status="done", error="", seconds=round(time.perf_counter() - start, 2))
    _write_json(info, folder / POINT_FILE)  # last: its "done" marks the point as finished
    return info


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, inherited by the kernel papermill starts)
    to ``path`` (appending) for the duration of a block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    return text.strip().splitlines()[-1][:500] if text.strip() else type(exc).__name__


# --------------------------------------------------------------------------- gathering
def _param_text(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


@dataclass
class SweepResult:
    """What :func:`sweep` ran and found: one record per point (:attr:`rows`, as in ``results.csv``), the points that
    failed, and the summary over seeds."""

    out: Path
    chapter: str
    rows: list[dict[str, Any]]
    skipped: int = 0
    summary: list[dict[str, Any]] = field(default_factory=list)
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tables(self) -> dict[tuple[str, str], list[dict[str, str]]]:
        """The summary over seeds in each recorded table's layout (:func:`summary_tables`)."""
        return summary_tables(self.summary, [n for n, lay in self.layouts.items() if lay.get("percent")])

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "done"]

    def frame(self):
        """:attr:`rows` as a pandas DataFrame."""
        import pandas as pd
        return pd.DataFrame(self.rows)


def gather(out: str | os.PathLike, points: Sequence[Mapping[str, Any]], chapter_id: str
           ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """One row per point (parameters, status, recorded table cells), read from the points' folders, and each
    recorded table's layout (name -> ``index`` columns, ``percent``)."""
    out = Path(out)
    names = list(dict.fromkeys(k for p in points for k in p))
    rows, layouts = [], {}
    for params in points:
        pid = point_id(params)
        folder = out / "points" / pid
        info = _read_point(folder) or {"status": "not run", "error": ""}
        row: dict[str, Any] = {n: _param_text(params.get(n)) for n in names}
        row.update(point=pid, status=info.get("status"), seconds=info.get("seconds"), worker=info.get("worker"),
                   error=info.get("error") or "")
        if info.get("status") == "done":
            found = sorted((folder / "results").glob(f"*/{chapter_id}.json"))  # the profile the notebook ran at
            profile = params.get("profile") or (found[0].parent.name if found else "cpu")
            data = load(chapter_id, profile, folder / "results")
            row.update(cells(data))
            for name, tab in tables(data).items():
                layouts.setdefault(name, {"index": tab["index"], "percent": tab.get("percent", False)})
        rows.append(row)
    return rows, layouts


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(c or "row" for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _arrow_column(values: list[Any]):
    """A parquet column: numbers as float64 (int64 when all are integers), booleans as bool, else text."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, pa.int64())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: list[dict[str, Any]], param_names: Sequence[str],
                  layouts: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """``results.csv``, ``results.parquet``, ``summary.csv`` and ``summary.md`` (all written atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([*param_names, *STATUS_COLUMNS, *(c for r in rows for c in r)]))

    def csv_text(records: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        return buf.getvalue()

    text_saver = lambda text, p: Path(p).write_text(text, encoding="utf-8")  # noqa: E731
    atomic_save(csv_text(rows, columns), out / "results.csv", saver=text_saver)
    atomic_save(pa.table({c: _arrow_column([r.get(c) for r in rows]) for c in columns}), out / "results.parquet",
                saver=lambda t, p: pq.write_table(t, p))
    scols = list(dict.fromkeys(k for s in summary for k in s)) or ["group", "table", "row", "column", "mean", "std", "n"]
    atomic_save(csv_text(summary, scols), out / "summary.csv", saver=text_saver)
    parts = ["# Sweep summary", "",
             "Mean ± std (numpy's std, ddof 0) over the points that differ only in their seeds (accuracies in %); "
             "n points each."]
    percent = [n for n, lay in (layouts or {}).items() if lay.get("percent")]
    for (group, name), trows in summary_tables(summary, percent).items():
        parts += ["", f"## {name} ({group})", "", _markdown(trows)]
    atomic_save("\n".join(parts) + "\n", out / "summary.md", saver=text_saver)


# --------------------------------------------------------------------------- the sweep
def _provenance(argv: Sequence[str] | None) -> dict[str, Any]:
    from . import __version__
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                                capture_output=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=Path(__file__).resolve().parent, text=True, capture_output=True,
                                    timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"vfnb": __version__, "commit": commit, "dirty": dirty, "host": socket.gethostname(), "device": device,
            "torch": torch.__version__, "python": sys.version.split()[0],
            "command": " ".join(argv) if argv else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def sweep(chapter: str | os.PathLike, grid: Mapping[str, Sequence[Any]] | None = None,
          parameters: Mapping[str, Any] | None = None, points: Sequence[Mapping[str, Any]] | None = None,
          profile: str | None = None, out: str | os.PathLike | None = None, workers: int = 2,
          scheduler: str | None = None, progress: bool = True, argv: Sequence[str] | None = None) -> SweepResult:
    """Run every point of ``grid`` × ``points`` (on top of ``parameters``) of one chapter on Dask, skipping the points
    ``out`` already holds, and write the gathered results (see the module docstring). Every point is validated
    first. ``scheduler``: the address of an existing Dask scheduler (its workers must see ``out`` and the zoo,
    ``VFNB_CACHE``, on a shared path); else a ``LocalCluster`` of ``workers`` processes with one thread each.

    Returns a :class:`SweepResult`; failed points are listed in it (and in ``results.csv``), not raised."""
    path = book.resolve_chapter(chapter)
    fixed = dict(parameters or {})
    if profile is not None:
        if fixed.get("profile", profile) != profile:
            raise SweepError(f"profile given twice: --profile {profile} and -p profile {fixed['profile']}")
        fixed["profile"] = profile
    if grid and "profile" in grid and "profile" in fixed:
        raise SweepError("profile is both fixed and swept; give it once")
    all_points = expand(grid, fixed, points)
    validate(path, all_points)
    if not isinstance(workers, int) or workers < 1:
        raise SweepError(f"workers must be an integer >= 1, got {workers!r}")
    out = (Path(out) if out is not None else book.repo_root() / "_build" / "sweeps" / path.stem).resolve()
    try:
        (out / "points").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create the sweep folder {out}: {exc}; choose another with --out") from exc
    cid = _chapter_id(path)
    param_names = list(dict.fromkeys(k for p in all_points for k in p))
    _write_json({"chapter": path.stem, "notebook": str(path), "grid": dict(grid or {}), "parameters": fixed,
                 "points": [dict(p) for p in points or []], "n_points": len(all_points),
                 "provenance": _provenance(argv)}, out / "sweep.json")
    todo = [p for p in all_points if not finished(out / "points" / point_id(p), p)]
    skipped = len(all_points) - len(todo)
    digest = book.source_digest()
    stale = [p for p in all_points if p not in todo
             and (_read_point(out / "points" / point_id(p)) or {}).get("code") != book.run_key(path, p, digest)]
    if stale:
        warnings.warn(f"{len(stale)} finished point(s) were computed by another version of the chapter or of vfnb; "
                      f"they are kept (delete their folders under {out / 'points'} to recompute them): "
                      f"{', '.join(point_id(p) for p in stale)}", StalePointsWarning, stacklevel=2)
    if todo:
        _run_all(path, todo, out, workers, scheduler, progress, skipped, len(all_points))
    rows, layouts = gather(out, all_points, cid)
    summary = summarize(rows, param_names)
    write_outputs(out, rows, summary, param_names, layouts)
    result = SweepResult(out, path.stem, rows, skipped, summary, layouts)
    if progress:
        failed = result.failures
        print(f"{len(all_points) - len(failed)}/{len(all_points)} points done ({skipped} skipped, already finished), "
              f"{len(failed)} failed; results in {out / 'results.csv'}", file=sys.stderr)
        for r in failed:
            print(f"  failed: point {r['point']} ({describe({n: r[n] for n in param_names})}): {r['error']}",
                  file=sys.stderr)
    return result


def _chapter_id(path: Path) -> str:
    try:
        return book.chapter_id(path)
    except book.BookError:
        return path.stem


def _run_all(path: Path, todo: list[dict[str, Any]], out: Path, workers: int, scheduler: str | None,
             progress: bool, skipped: int, total: int) -> None:
    import logging

    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
        threads = max(1, (os.cpu_count() or 1) // workers)
    else:
        threads = None  # the cluster's workers decide
    try:
        with Client(cluster if cluster is not None else scheduler) as client:
            futures = [client.submit(run_point, str(path), p, str(out / "points" / point_id(p)), threads,
                                     key=f"vfnb-point-{point_id(p)}-{uuid.uuid4().hex[:6]}", pure=False)
                       for p in todo]
            failed = 0
            with tqdm(total=total, initial=skipped, desc=f"sweep {path.stem}", disable=not progress,
                      unit="point") as bar:
                for fut in as_completed(futures):
                    try:
                        info = fut.result()
                    except Exception as exc:  # noqa: BLE001 -- e.g. KilledWorker after repeated worker deaths
                        info = {"status": "failed", "error": _error_text(exc)}
                        idx = futures.index(fut)
                        _write_json({"parameters": json.loads(json.dumps(todo[idx], default=str)), **info},
                                    out / "points" / point_id(todo[idx]) / POINT_FILE)
                    failed += info.get("status") != "done"
                    bar.update(1)
                    bar.set_postfix(failed=failed)
    finally:
        if cluster is not None:
            cluster.close()


def sweep_spec(chapter: str | None, grid_file: str | None, axes: Iterable[str], fixed: Mapping[str, Any],
               profile: str | None) -> tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]], str | None]:
    """Combine a sweep file and command-line options (``-g``, ``-p``, ``--profile``; the command line wins over
    the file only where the file is silent; naming a parameter in both is an error)."""
    spec = load_grid(grid_file) if grid_file else {}
    grid = dict(spec.get("grid") or {})
    for text in axes:
        name, values = parse_axis(text)
        if name in grid:
            raise SweepError(f"grid axis {name!r} given twice")
        grid[name] = values
    params = dict(spec.get("parameters") or {})
    for name, value in fixed.items():
        if name in params:
            raise SweepError(f"parameter {name!r} is fixed both in {grid_file} and by -p")
        params[name] = value
    chapter = chapter or spec.get("chapter")
    if not chapter:
        raise SweepError("name the chapter: vfnb sweep CHAPTER, or 'chapter:' in the sweep file")
    if profile is not None and spec.get("profile") not in (None, profile):
        raise SweepError(f"profile given twice: --profile {profile} and profile: {spec['profile']} in {grid_file}")
    return str(chapter), grid, params, list(spec.get("points") or []), profile or spec.get("profile")
