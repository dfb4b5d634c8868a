"""The zoo: trained edge models cached on disk, keyed by their full training configuration.

Layout: ``<cache>/<model>-<dataset>-s<seed>-<key>/`` holds ``model.safetensors`` (weights, loaded
without running code), ``meta.json`` (configuration, metrics, SHA-256 of the weights, library
versions) and, while training, ``resume.pt`` (read with ``weights_only=True``). ``meta.json`` is
written last, so a folder without it is an unfinished run that the next call resumes.
"""
from __future__ import annotations

import hashlib
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from .config import default_cache_dir
from .models import build_model
from .train import TrainConfig, atomic_save, data_kwargs, train

FORMAT = "vfnb-zoo-1"


class CorruptCheckpointError(RuntimeError):
    """A cached model is truncated, foreign, or was trained with another configuration."""


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


def get_or_train(config: TrainConfig, cache_dir: str | Path | None = None, data_root: str | Path | None = None,
                 device: str | torch.device | None = "auto", progress: bool = True) -> nn.Module:
    """Return the edge model for ``config``, training it only if the cache does not hold it.

    A cached entry is verified (configuration, checksum, architecture); a corrupt one is reported
    with a warning and retrained, never silently used. An unfinished run resumes from its last
    epoch. The model is returned in eval mode on ``device``; see :func:`info` for its metrics.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"get_or_train expects a vfnb.TrainConfig, got {type(config).__name__}")
    device = resolve_device(device)
    try:
        return load_entry(config, cache_dir, device)[0]
    except FileNotFoundError:
        pass
    except CorruptCheckpointError as exc:
        warnings.warn(f"discarding a corrupt zoo entry and retraining: {exc}")
        (entry_dir(config, cache_dir) / "meta.json").unlink(missing_ok=True)
    from .data import calibration_subset, load_dataset

    train_data = load_dataset(config.dataset, "train", root=data_root)
    if config.n_train is not None:
        if config.n_train > len(train_data):
            raise ValueError(f"n_train={config.n_train} but {config.dataset} has {len(train_data)} training images")
        train_data = calibration_subset(train_data, config.n_train, seed=0)
    test_data = load_dataset(config.dataset, "test", root=data_root)
    d = entry_dir(config, cache_dir)
    for stale in d.glob(".*.tmp"):  # left by a run killed in the middle of a write
        stale.unlink(missing_ok=True)
    model, history = train(config, train_data, test_data, checkpoint=d / "resume.pt", device=device,
                           progress=progress)
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


def info(config: TrainConfig, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The stored metadata (configuration, metrics, history, versions) of a trained model."""
    meta_path = entry_dir(config, cache_dir) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{config.model} seed {config.seed} is not in the zoo yet; call get_or_train first")
    return json.loads(meta_path.read_text())


def train_cli(args: Any) -> int:
    """``python -m vfnb train``: train (or find) one edge model and print where it lives."""
    from .train import recipe
    extra = {"epochs": args.epochs} if getattr(args, "epochs", None) else {}
    cfg = recipe(args.model, getattr(args, "profile", None) or "cpu", dataset=getattr(args, "dataset", None),
                 seed=args.seed, **extra)
    get_or_train(cfg, data_root=getattr(args, "data_root", None))
    meta = info(cfg)
    print(f"{entry_dir(cfg)}  test accuracy {meta['metrics']['test_accuracy']:.4f}")
    return 0
