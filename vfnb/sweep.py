"""Sweeps: a grid of parameter sets of one chapter, each point a papermill run checked and executed as ``vfnb run``
does (:func:`vfnb.book.validate_run`; the same kernel, working folder and ``PYTHONPATH``), on Dask distributed,
gathered into one table and averaged over seeds in the paper's table layout.

``vfnb sweep CHAPTER -g seeds='[[0, 1], [2, 3], [4, 5]]' --out DIR`` (or :func:`sweep` in Python) writes into ``DIR``:

- ``points/<id>/chapter.ipynb``: the executed notebook of one point; ``points/<id>/results/``: what the chapter
  recorded (:mod:`vfnb.results`); ``points/<id>/point.json``: its parameters, status (``done``/``failed``), error,
  time and worker; ``points/<id>/run.log``: what its kernel printed; ``points/<id>/failed.ipynb``: the notebook of
  a failed point, up to its error. ``<id>`` is a hash of the point's parameters, so a point keeps its folder when
  the grid grows.
- ``results.csv`` and ``results.parquet``: one row per point, the parameters as columns (lists as JSON text), then
  ``point``, ``status``, ``seconds``, ``worker``, ``commit``, ``device``, ``error``, one column per cell of every
  table the chapter recorded (:func:`vfnb.results.record_table`), named ``<table>: <row> | <column>``, and one per
  claim of its claims table (its verdict).
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
import shlex
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
from .results import RUNTIME_PARAMS, cells, describe, load, summarize, summary_tables, tables
from .train import atomic_save

#: Fixed columns of results.csv after the parameters.
STATUS_COLUMNS = ("point", "status", "seconds", "worker", "commit", "device", "error")
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
    if isinstance(value, list):  # items typed like -p values (YAML leaves e.g. 1e-3 as text)
        value = [book.parse_value(v) if isinstance(v, str) else v for v in value]
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
    """A point's folder name: a hash of its parameters (stable across runs and grid orders), without those that say
    where it runs (:data:`vfnb.results.RUNTIME_PARAMS`: moving the data or the zoo does not make a new point)."""
    text = json.dumps({k: v for k, v in params.items() if k not in RUNTIME_PARAMS}, sort_keys=True, default=str)
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
    """Whether the point in ``folder`` ran to the end with exactly these parameters (its record says ``done``, and
    its notebook or its recorded results are there: a fresh clone of committed results has only the latter)."""
    info = _read_point(folder)
    return bool(info and info.get("status") == "done" and info.get("parameters") == json.loads(
        json.dumps(dict(params), default=str)) and ((folder / NOTEBOOK).is_file() or (folder / "results").is_dir()))


def _write_json(data: Any, path: Path) -> None:
    atomic_save(json.dumps(data, indent=1, default=str, ensure_ascii=False), path,
                saver=lambda text, p: Path(p).write_text(text, encoding="utf-8"))


def run_point(chapter: str, params: dict[str, Any], folder: str, threads: int | None = None,
              force: bool = False) -> dict[str, Any]:
    """Execute one point of a sweep into ``folder`` and return its ``point.json`` record. Runs on a Dask worker.

    The chapter runs in a child process (:data:`POINT_SCRIPT`, papermill) with its own environment (``VFNB_RESULTS`` in a
    temporary folder, ``OMP_NUM_THREADS`` = ``threads``) and its output appended to ``run.log``, so several points
    may share a worker process; the child exits when the worker dies. A lock file keeps two runs of one point (two
    sweeps, or a rerun while a cluster still runs the first) from overlapping. A failing notebook is recorded
    (``status: failed`` with the error, the notebook up to its error in ``failed.ipynb``), not raised, so the other
    points go on. ``force``: run even if the point finished (to recompute a stale one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _point_lock(folder):
        if not force and finished(folder, params):  # e.g. re-submitted after its first worker died at the very end
            return _read_point(folder)  # type: ignore[return-value]
        for stale in folder.glob(".partial-*"):  # left by a run that was killed (its lock went with it)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        token = uuid.uuid4().hex[:8]
        partial_nb = folder / f".partial-{token}.ipynb"
        partial_results = folder / f".partial-{token}-results"
        error_file = folder / f".partial-{token}-error.txt"
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, VFNB_RESULTS=str(partial_results),
                   PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        info: dict[str, Any] = {"parameters": json.loads(json.dumps(params, default=str)), "chapter": str(chapter),
                                "code": book.run_key(Path(chapter), params),  # notebook + parameters + library
                                "worker": f"{socket.gethostname()}:{os.getpid()}",
                                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                **_machine()}
        start = time.perf_counter()
        with open(folder / LOG, "a", encoding="utf-8") as log:
            log.write(f"=== {info['started']} on {info['worker']} ({info['device']})\n")
            log.flush()
            proc = subprocess.run([sys.executable, "-c", POINT_SCRIPT, str(chapter), json.dumps(params, default=str),
                                   str(partial_nb), str(error_file), str(os.getpid()), str(Path(chapter).parent)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(folder))
        seconds = round(time.perf_counter() - start, 2)
        if proc.returncode != 0:
            error = _error_text(json.loads(error_file.read_text(encoding="utf-8"))) if error_file.is_file() else \
                f"the point's process exited with status {proc.returncode}; see {folder / LOG}"
            info.update(status="failed", error=error, seconds=seconds)
            if partial_nb.exists():  # the notebook as far as it ran, with the traceback, for the reader to open
                os.replace(partial_nb, folder / FAILED_NOTEBOOK)
            error_file.unlink(missing_ok=True)
            _write_json(info, folder / POINT_FILE)
            return info
        results = folder / "results"
        if results.exists():
            shutil.rmtree(results)
        if partial_results.exists():
            os.replace(partial_results, results)
        os.replace(partial_nb, folder / NOTEBOOK)
        (folder / FAILED_NOTEBOOK).unlink(missing_ok=True)
        info.update(status="done", error="", seconds=seconds)
        _write_json(info, folder / POINT_FILE)  # last: its "done" marks the point as finished
        return info


@contextmanager
def _point_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` exclusively (waiting for another run of the same point). ``flock`` locks are local to
    a machine on some network filesystems; there, do not run one output folder from two sweeps at once."""
    import fcntl

    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


#: The child process of one point: papermill only (no torch, no vfnb import: it starts in well under a second),
#: exiting when its worker is gone. Arguments: chapter, parameters (JSON), output, error file, worker pid, cwd. The
#: worker validated the parameters; the error file gets the exception's name and value for :func:`_error_text`.
POINT_SCRIPT = """
import json, os, sys, threading, time, traceback
chapter, params, output, error_file, parent, cwd = sys.argv[1:]
def watch():
    while os.getppid() == int(parent):
        time.sleep(1.0)
    os._exit(3)
threading.Thread(target=watch, daemon=True).start()
try:
    import papermill
    papermill.execute_notebook(chapter, output, parameters=json.loads(params), kernel_name="python3",
                               progress_bar=False, cwd=cwd)
except Exception as exc:
    with open(error_file, "w", encoding="utf-8") as fh:
        json.dump({"type": type(exc).__name__, "text": str(exc), "ename": getattr(exc, "ename", None),
                   "evalue": getattr(exc, "evalue", None)}, fh)
    traceback.print_exc()
    sys.exit(1)
"""


def _machine() -> dict[str, Any]:
    """Where a point runs: commit of the vfnb source (and whether it had uncommitted changes), device, host, versions."""
    from . import __version__
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, text=True, capture_output=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, text=True,
                                    capture_output=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({_cores()} cores)"
    return {"commit": commit, "dirty": dirty, "device": device, "host": socket.gethostname(), "vfnb": __version__,
            "torch": torch.__version__, "python": sys.version.split()[0]}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (affinity, cgroups' cpusets)
    except AttributeError:
        return os.cpu_count() or 1


def _error_text(exc: BaseException | Mapping[str, Any]) -> str:
    """One line for a failed point: a notebook error's name and value (papermill's ``ename``/``evalue``), else the
    exception's type and message. ``exc`` may be the mapping the point's child process wrote."""
    if isinstance(exc, BaseException):
        exc = {"type": type(exc).__name__, "text": str(exc), "ename": getattr(exc, "ename", None),
               "evalue": getattr(exc, "evalue", None)}
    text = f"{exc['ename']}: {exc['evalue']}" if exc.get("ename") else f"{exc['type']}: {exc['text']}"
    return text.strip().splitlines()[-1][:500] if text.strip() else str(exc["type"])


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
    """One row per point (parameters; status, seconds, worker, commit of the vfnb source, ``+`` if it had uncommitted
    changes, and device; recorded table cells and claim verdicts), read from the points' folders, and each recorded
    table's layout (name -> ``index`` columns, ``percent``)."""
    out = Path(out)
    names = list(dict.fromkeys(k for p in points for k in p))
    rows, layouts = [], {}
    first = _runs(out)[0] if _runs(out) else {}  # points recorded before points kept their own provenance
    for params in points:
        pid = point_id(params)
        folder = out / "points" / pid
        info = _read_point(folder) or {"status": "not run", "error": ""}
        row: dict[str, Any] = {n: _param_text(params.get(n)) for n in names}
        row.update(point=pid, status=info.get("status"), seconds=info.get("seconds"), worker=info.get("worker"),
                   commit=(info.get("commit") or first.get("commit") or "")[:12] + ("+" if (
                       info.get("dirty") if "commit" in info else first.get("dirty")) else ""),
                   device=info.get("device") or first.get("device") or "", error=info.get("error") or "")
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
    summary = [{**s, "percent": bool((layouts or {}).get(s["table"], {}).get("percent"))} for s in summary]
    scols = list(dict.fromkeys(k for s in summary for k in s)) or ["group", "table", "row", "column", "mean", "std", "n",
                                                                     "values", "percent"]
    atomic_save(csv_text(summary, scols), out / "summary.csv", saver=text_saver)
    parts = ["# Sweep summary", "",
             "Mean ± std over the n points that differ only in their seeds (numpy's std: ddof 0, i.e. without "
             "Bessel's correction; accuracies in %)."]
    percent = [n for n, lay in (layouts or {}).items() if lay.get("percent")]
    for (group, name), trows in summary_tables(summary, percent).items():
        parts += ["", f"## {name} ({group})", "", _markdown(trows)]
    atomic_save("\n".join(parts) + "\n", out / "summary.md", saver=text_saver)


# --------------------------------------------------------------------------- the sweep
def _runs(out: Path) -> list[dict[str, Any]]:
    """The history of calls recorded in ``out/sweep.json`` (oldest first; an older file's single ``provenance``)."""
    try:
        spec = json.loads((Path(out) / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return list(spec.get("runs") or ([spec["provenance"]] if spec.get("provenance") else []))


def sweep(chapter: str | os.PathLike, grid: Mapping[str, Sequence[Any]] | None = None,
          parameters: Mapping[str, Any] | None = None, points: Sequence[Mapping[str, Any]] | None = None,
          profile: str | None = None, out: str | os.PathLike | None = None, workers: int = 2,
          scheduler: str | None = None, progress: bool = True, argv: Sequence[str] | None = None,
          rerun_stale: bool = False) -> SweepResult:
    """Run every point of ``grid`` × ``points`` (on top of ``parameters``) of one chapter on Dask, skipping the points
    ``out`` already holds, and write the gathered results (see the module docstring). Every point is validated
    first. ``scheduler``: the address of an existing Dask scheduler (its workers must see ``out`` and the zoo,
    ``VFNB_CACHE``, on a shared path); else a ``LocalCluster`` of ``workers`` processes with one thread each.
    ``out`` defaults to ``sweeps/<chapter>`` in the source checkout. Finished points computed by another version of
    the chapter or of vfnb are kept with a :class:`StalePointsWarning`, or recomputed with ``rerun_stale``.
    Ctrl-C stops the sweep after writing the tables of what finished (a rerun resumes), then re-raises.

    Returns a :class:`SweepResult`; failed points are listed in it (and in ``results.csv``), not raised."""
    path = book.resolve_chapter(chapter)
    fixed = dict(parameters or {})
    if profile is not None:
        if fixed.get("profile", profile) != profile:
            raise SweepError(f"profile given twice: --profile {profile} and -p profile {fixed['profile']}")
        fixed["profile"] = profile
    all_points = expand(grid, fixed, points)
    validate(path, all_points)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SweepError(f"workers must be an integer >= 1, got {workers!r}")
    out = (Path(out) if out is not None else book.repo_root() / "sweeps" / path.stem).resolve()
    try:
        (out / "points").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create the sweep folder {out}: {exc}; choose another with --out") from exc
    cid = _chapter_id(path)
    param_names = list(dict.fromkeys(k for p in all_points for k in p))
    todo = [p for p in all_points if not finished(out / "points" / point_id(p), p)]
    digest = book.source_digest()
    stale = [p for p in all_points if p not in todo
             and (_read_point(out / "points" / point_id(p)) or {}).get("code") != book.run_key(path, p, digest)]
    if stale and rerun_stale:
        todo += stale
    elif stale:
        warnings.warn(f"{len(stale)} finished point(s) were computed by another version of the chapter or of vfnb; "
                      f"they are kept (rerun_stale=True, or --rerun-stale, recomputes them): "
                      f"{', '.join(point_id(p) for p in stale)}", StalePointsWarning, stacklevel=2)
    skipped = len(all_points) - len(todo)
    run = {"command": shlex.join(argv) if argv else None,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "points run": len(todo), "points skipped": skipped, **_machine()}
    _write_json({"chapter": path.stem, "notebook": str(path), "grid": dict(grid or {}), "parameters": fixed,
                 "points": [dict(p) for p in points or []], "n_points": len(all_points),
                 "runs": [*_runs(out), run]}, out / "sweep.json")
    interrupted = False
    if todo:
        try:
            _run_all(path, todo, out, workers, scheduler, progress, skipped, len(all_points),
                     force={point_id(p) for p in stale} if rerun_stale else set())
        except KeyboardInterrupt:
            interrupted = True
    rows, layouts = gather(out, all_points, cid)
    summary = summarize(rows, param_names)
    write_outputs(out, rows, summary, param_names, layouts)
    result = SweepResult(out, path.stem, rows, skipped, summary, layouts)
    failed = result.failures
    if progress or failed or interrupted:  # failures are always reported
        print(f"{len(all_points) - len(failed)}/{len(all_points)} points done ({skipped} skipped, already finished), "
              f"{len(failed)} failed or not run; results in {out / 'results.csv'}", file=sys.stderr)
        for r in failed:
            print(f"  {r['status']}: point {r['point']} ({describe({n: r[n] for n in param_names})})"
                  f"{': ' + r['error'] if r['error'] else ''}", file=sys.stderr)
    if interrupted:
        print("interrupted: the tables above hold the points that finished; run the same command again to resume",
              file=sys.stderr)
        raise KeyboardInterrupt
    return result


def _chapter_id(path: Path) -> str:
    try:
        return book.chapter_id(path)
    except book.BookError:
        return path.stem


def _run_all(path: Path, todo: list[dict[str, Any]], out: Path, workers: int, scheduler: str | None,
             progress: bool, skipped: int, total: int, force: set[str] = frozenset()) -> None:
    import logging

    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    cluster = None
    if scheduler is None:  # dashboard on a free port: a fixed one clashes with another sweep or notebook cluster
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
        threads = max(1, _cores() // workers)
    else:
        threads = None  # the cluster's workers decide
    try:
        with Client(cluster if cluster is not None else scheduler) as client:
            futures = {client.submit(run_point, str(path), p, str(out / "points" / point_id(p)), threads,
                                     point_id(p) in force, key=f"vfnb-point-{point_id(p)}-{uuid.uuid4().hex[:6]}",
                                     pure=False): p for p in todo}
            failed = 0
            with tqdm(total=total, initial=skipped, desc=f"sweep {path.stem}", disable=not progress,
                      unit="point") as bar:
                for fut in as_completed(futures):
                    try:
                        info = fut.result()
                    except Exception as exc:  # noqa: BLE001 -- e.g. KilledWorker after repeated worker deaths
                        info = {"status": "failed", "error": _error_text(exc)}
                        params = futures[fut]
                        _write_json({"parameters": json.loads(json.dumps(params, default=str)), **info},
                                    out / "points" / point_id(params) / POINT_FILE)
                    failed += info.get("status") != "done"
                    bar.update(1)
                    bar.set_postfix(failed=failed)
    finally:
        if cluster is not None:
            cluster.close()


def sweep_spec(chapter: str | None, grid_file: str | None, axes: Iterable[str], fixed: Mapping[str, Any],
               profile: str | None) -> tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]], str | None]:
    """Combine a sweep file with the command line's ``-g``, ``-p`` and ``--profile``: each adds what the file does
    not set; naming one axis, parameter or profile in both is an error. Returns chapter, grid, fixed parameters,
    points and profile."""
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

