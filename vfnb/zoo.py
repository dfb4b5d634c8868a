"""The zoo: trained edge models cached on disk, keyed by their full training configuration.

Layout: ``<cache>/<model>-<dataset>-s<seed>-<key>/`` holds ``model.safetensors`` (weights, loaded
without running code), ``meta.json`` (configuration, metrics, SHA-256 of the weights, library
versions) and, while training, ``resume.pt`` (read with ``weights_only=True``). ``meta.json`` is
written last, so a folder without it is an unfinished run that the next call resumes.

Training an entry holds an exclusive lock (``fcntl.flock`` on ``<cache>/.locks/<entry>.lock``), so
processes that ask for the same configuration at once train it once: the others wait, then load
it. Every file is written atomically (a uniquely named temporary file, then a rename) with the
mode the umask gives, so a shared zoo stays readable.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock (writes stay atomic, concurrent runs may both train)
    fcntl = None  # type: ignore[assignment]

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from .config import default_cache_dir
from .models import build_model
from .train import TEMP_SUFFIX, TrainConfig, atomic_save, data_kwargs, hostname, snapshot_path, temp_owner, train

FORMAT = "vfnb-zoo-1"
#: The folder (inside an entry) of the per-epoch weights of a ``snapshots=True`` model.
SNAPSHOTS = "epochs"
#: The folder (inside the cache) of the lock files, one per entry.
LOCKS = ".locks"
#: A temporary file whose writer is unknown (another host, an older vfnb) counts as left over once
#: it has not changed for this long; one write takes seconds.
STALE_TEMP_SECONDS = 3 * 3600


class CorruptCheckpointError(RuntimeError):
    """A cached model is truncated, foreign, or was trained with another configuration."""


class CacheDirError(OSError):
    """The zoo's cache folder cannot be written: it is a file, lies under one, or is not writable."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def entry_dir(config: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """The folder that holds (or will hold) the model trained with ``config``."""
    return default_cache_dir(cache_dir) / f"{config.model}-{config.dataset}-s{config.seed}-{config.key}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import numpy
    from . import __version__
    return {"vfnb": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def load_entry(config: TrainConfig, cache_dir: str | Path | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a cached model and its metadata, verifying that it is exactly what ``config`` asks for.

    Raises ``FileNotFoundError`` if it was never trained and :class:`CorruptCheckpointError` if
    the files are truncated, foreign, or belong to another configuration.
    """
    d = entry_dir(config, cache_dir)
    meta_path, weights = d / "meta.json", d / "model.safetensors"
    if not meta_path.exists():
        raise FileNotFoundError(f"no trained model for this configuration in {d}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{meta_path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{meta_path} is not a vfnb zoo entry (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{meta_path} is not a vfnb zoo entry (format {meta.get('format')!r})")
    if meta.get("config") != config.to_dict():
        raise CorruptCheckpointError(
            f"{d} holds a model trained with another configuration:\n stored    {meta.get('config')}\n"
            f" requested {config.to_dict()}")
    if not weights.exists() or _sha256(weights) != meta.get("sha256"):
        raise CorruptCheckpointError(f"{weights} is missing, truncated or replaced (checksum mismatch)")
    try:
        model = build_model(config.model, **meta["model_kwargs"])
        state = load_file(str(weights), device=str(device))
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise CorruptCheckpointError(f"{weights} does not fit {config.model}: {exc}") from exc
    return model.to(device).eval(), meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """Whether the temporary file ``path`` was left by a writer that is gone.

    A file of a process of this host is stale once that process has ended; any other one (another
    host, an older naming) once it is older than :data:`STALE_TEMP_SECONDS`.
    """
    owner = temp_owner(path)
    if owner is not None and owner[0] == hostname():
        if owner[1] == os.getpid() or _pid_alive(owner[1]):
            return False
        return True
    try:
        return time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` left by killed writers (never a live writer's)."""
    removed = []
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        if is_stale_temp(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _cache_error(root: Path, cache_dir: str | Path | None, exc: OSError) -> CacheDirError:
    """A :class:`CacheDirError` that says which folder, where it came from, what is wrong and the fix."""
    if cache_dir is not None:
        source = "the cache_dir argument"
    elif os.environ.get("VFNB_CACHE"):
        source = "$VFNB_CACHE"
    else:
        source = "the default, as VFNB_CACHE is not set"
    existing = Path(exc.filename) if getattr(exc, "filename", None) else root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    else:
        reason = f"{exc.strerror or exc} ({exc.filename or root})"
    return CacheDirError(
        f"cannot store trained models in the zoo cache {root} (from {source}): {reason}. Set the "
        f"VFNB_CACHE environment variable (or cache_dir) to a writable folder, e.g. VFNB_CACHE=/tmp/vfnb-zoo")


def check_cache_writable(config: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """Create the entry folder of ``config`` and make sure files can be written there; return it.

    Raises :class:`CacheDirError`, naming ``VFNB_CACHE`` and the path, if the cache is a file, lies
    under a file, or is not writable, so that nothing is trained only to be lost.
    """
    root, d = default_cache_dir(cache_dir), entry_dir(config, cache_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        (root / LOCKS).mkdir(exist_ok=True)
        probe = d / f".write-probe.{hostname()}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as exc:
        raise _cache_error(root, cache_dir, exc) from exc
    return d


@contextlib.contextmanager
def entry_lock(config: TrainConfig, cache_dir: str | Path | None = None, progress: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of ``config``'s entry (waiting for another holder); yield the lock file."""
    root = default_cache_dir(cache_dir)
    path = root / LOCKS / f"{entry_dir(config, cache_dir).name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file in a shared zoo: a read-only descriptor locks too
            fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _cache_error(root, cache_dir, exc) from exc
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    print(f"waiting for another process that trains {config.model} seed {config.seed} "
                          f"(lock {path})", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)  # releases the lock


def get_or_train(config: TrainConfig, cache_dir: str | Path | None = None, data_root: str | Path | None = None,
                 device: str | torch.device | None = "auto", progress: bool = True) -> nn.Module:
    """Return the edge model for ``config``, training it only if the cache does not hold it.

    A cached entry is verified (configuration, checksum, architecture); a corrupt one is reported
    with a warning and retrained, never silently used. An unfinished run resumes from its last
    epoch. Concurrent calls for one configuration (threads or processes) train it once: the others
    wait for the lock, then load the result. The cache is checked for writability before training
    (:class:`CacheDirError`). The model is returned in eval mode on ``device``; see :func:`info`
    for its metrics.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"get_or_train expects a vfnb.TrainConfig, got {type(config).__name__}")
    device = resolve_device(device)
    try:  # a finished entry needs no lock (meta.json is written last), so a read-only zoo serves hits
        return load_entry(config, cache_dir, device)[0]
    except (FileNotFoundError, CorruptCheckpointError):
        pass
    if config.init_from is not None:  # a fine-tuned model needs its foundation first, outside this entry's lock
        get_or_train(config.foundation, cache_dir, data_root, device, progress)
    d = check_cache_writable(config, cache_dir)
    with entry_lock(config, cache_dir, progress):
        try:  # another process may have trained it while this one waited
            return load_entry(config, cache_dir, device)[0]
        except FileNotFoundError:
            pass
        except CorruptCheckpointError as exc:
            warnings.warn(f"discarding a corrupt zoo entry and retraining: {exc}")
            (d / "meta.json").unlink(missing_ok=True)
        remove_stale_temps(d)  # left by a run killed in the middle of a write
        return _train_entry(config, d, data_root, device, progress, cache_dir)


def _train_entry(config: TrainConfig, d: Path, data_root: str | Path | None, device: torch.device,
                 progress: bool, cache_dir: str | Path | None = None) -> nn.Module:
    """Train ``config`` (resuming ``d/resume.pt``) and write its entry into ``d``; the caller holds the lock."""
    from .data import calibration_subset, load_dataset

    train_data = load_dataset(config.dataset, "train", root=data_root)
    if config.n_train is not None:
        if config.n_train > len(train_data):
            raise ValueError(f"n_train={config.n_train} but {config.dataset} has {len(train_data)} training images")
        train_data = calibration_subset(train_data, config.n_train, seed=0)
    test_data = load_dataset(config.dataset, "test", root=data_root)
    init_state = None
    if config.init_from is not None:
        init_state = load_entry(config.foundation, cache_dir, device)[0].state_dict()
    model, history = train(config, train_data, test_data, checkpoint=d / "resume.pt", device=device,
                           progress=progress, snapshot_dir=d / SNAPSHOTS if config.snapshots else None,
                           init_state=init_state)
    weights = d / "model.safetensors"
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_save(state, weights, saver=lambda obj, p: save_file(obj, p))
    meta = {
        "format": FORMAT,
        "config": config.to_dict(),
        "key": config.key,
        "model_kwargs": {**config.model_kwargs, **data_kwargs(config.model, train_data.in_channels,
                                                               train_data.image_size, train_data.num_classes)},
        "metrics": {"test_accuracy": history["test_acc"][-1], "train_loss": history["train_loss"][-1]},
        "history": history,
        "sha256": _sha256(weights),
        "versions": _versions(),
    }
    atomic_save(json.dumps(meta, indent=1), d / "meta.json", saver=lambda s, p: Path(p).write_text(s))
    (d / "resume.pt").unlink(missing_ok=True)
    return model.eval()


def snapshots(config: TrainConfig, cache_dir: str | Path | None = None) -> list[dict[str, torch.Tensor]]:
    """The weights of a ``snapshots=True`` model at initialization and after every epoch (``[0]`` is the
    initialization), loaded without running code; the model must be in the zoo (:func:`get_or_train`)."""
    if not config.snapshots:
        raise ValueError("this configuration keeps no snapshots: train it with snapshots=True "
                         "(e.g. recipe(..., snapshots=True))")
    info(config, cache_dir)  # raises if the model is not in the zoo yet
    folder = entry_dir(config, cache_dir) / SNAPSHOTS
    out = []
    for epoch in range(config.epochs + 1):
        path = snapshot_path(folder, epoch)
        try:
            out.append(load_file(path))
        except Exception as exc:
            raise CorruptCheckpointError(f"snapshot {path} of {config.model} seed {config.seed} is missing or corrupt "
                                         f"({exc}); delete {path.parent.parent} to retrain it") from exc
    return out


def info(config: TrainConfig, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The stored metadata (configuration, metrics, history, versions) of a trained model."""
    meta_path = entry_dir(config, cache_dir) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{config.model} seed {config.seed} is not in the zoo yet; call get_or_train first")
    return json.loads(meta_path.read_text())


def train_cli(args: Any) -> int:
    """``python -m vfnb train``: train (or find) one edge model and print where it lives.

    The values are checked like a chapter's parameters (:func:`vfnb.config.check_value`), so a bad
    one gives the same :class:`~vfnb.config.ConfigError` message either way.
    """
    from .config import ConfigError, check_value
    from .models import MODELS
    from .train import recipe

    profile = getattr(args, "profile", None) or "cpu"
    dataset, epochs = getattr(args, "dataset", None), getattr(args, "epochs", None)
    if args.model not in MODELS:
        raise ConfigError(f"parameter 'model' = {args.model!r} is not allowed: it must be one of {', '.join(MODELS)}")
    check_value("profile", profile)
    if dataset is not None:
        check_value("dataset", dataset)
    check_value("seed", args.seed)
    extra = {}
    if epochs is not None:  # 0 is a bad value, not "the profile's default"
        check_value("epochs", epochs)
        extra["epochs"] = epochs
    cfg = recipe(args.model, profile, dataset=dataset, seed=args.seed, **extra)
    get_or_train(cfg, data_root=getattr(args, "data_root", None))
    meta = info(cfg)
    print(f"{entry_dir(cfg)}  test accuracy {meta['metrics']['test_accuracy']:.4f}")
    return 0
