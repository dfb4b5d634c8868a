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
from typing import Any

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
