"""Training recipes (paper Table 2) and a resumable training loop."""
from __future__ import annotations

import math

import dataclasses
import hashlib
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .models import build_model

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "warmup_step", "warmup_cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained edge model; its hash is the zoo key.

    ``model_kwargs`` holds architecture choices (width, norm, depth, ...); the input shape and
    number of classes follow the dataset. ``n_train=None`` uses the whole training split.
    Step decay divides the learning rate by 10 at 51 % and 77 % of training (the paper's epochs
    82 and 123 of 160); ``warmup_step`` also ramps it linearly from 1e-6 during the first epoch.
    ``warmup_cosine`` (Git Re-Basin's MNIST recipe, appendix A.4) ramps linearly during the first epoch, then
    follows a cosine down to 0. ``grad_clip`` caps the global gradient norm of every step (``None``: no
    clipping). ``snapshots=True`` keeps the weights after every epoch (and at initialization) in the zoo
    entry, for measurements along training (appendix A.4, Figure 9). ``init_from`` (another configuration, as a
    ``TrainConfig`` or its ``to_dict()``) starts training from that model's trained weights instead of a random
    initialization: fine-tuning an expert from a foundation model (multi-task merging); the zoo trains the
    foundation first.
    """

    model: str
    dataset: str = "mnist5k"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    epochs: int = 5
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    schedule: str = "step"
    n_train: int | None = None
    grad_clip: float | None = None
    snapshots: bool = False
    init_from: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        # JSON round trip: tuples become lists, so the stored config compares equal to the request
        object.__setattr__(self, "model_kwargs", json.loads(json.dumps(self.model_kwargs)))
        for name, lo in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.snapshots, bool):
            raise ValueError(f"TrainConfig.snapshots must be True or False, got {self.snapshots!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.init_from is not None:
            base = self.init_from if isinstance(self.init_from, TrainConfig) else TrainConfig.from_dict(self.init_from)
            if base.model != self.model or base.model_kwargs != self.model_kwargs:
                raise ValueError(f"TrainConfig.init_from must be a configuration of the same architecture: it trains "
                                 f"{base.model} {base.model_kwargs}, this one {self.model} {self.model_kwargs}")
            from .data import dataset_shape
            try:
                shapes = dataset_shape(base.dataset), dataset_shape(self.dataset)
            except ValueError:
                shapes = None  # an unknown dataset fails where it is loaded
            if shapes is not None and shapes[0] != shapes[1]:
                raise ValueError(f"TrainConfig.init_from: the foundation's data {base.dataset} (channels, side, classes "
                                 f"{shapes[0]}) does not fit {self.dataset} {shapes[1]}; fine-tune on data of the same "
                                 "shape and number of classes")
            object.__setattr__(self, "init_from", base.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """All fields; ``grad_clip`` and ``snapshots`` only when set, so configurations without them keep their
        zoo keys."""
        d = dataclasses.asdict(self)
        if d["grad_clip"] is None:
            del d["grad_clip"]
        if not d["snapshots"]:
            del d["snapshots"]
        if d["init_from"] is None:
            del d["init_from"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"not a vfnb TrainConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    @property
    def key(self) -> str:
        """A stable hash of the full configuration (the zoo key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def foundation(self) -> "TrainConfig | None":
        """The configuration whose trained weights this one starts from (``init_from``), or ``None``."""
        return None if self.init_from is None else TrainConfig.from_dict(self.init_from)


def data_kwargs(model: str, in_channels: int, image_size: int, num_classes: int) -> dict[str, Any]:
    """The architecture arguments that follow from the dataset."""
    if model == "mlp":
        return {"in_features": in_channels * image_size * image_size, "num_classes": num_classes}
    return {"in_channels": in_channels, "num_classes": num_classes, "input_size": image_size}


def learning_rate(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` of ``epoch`` (both from 0) under ``config.schedule``."""
    lr = config.lr
    if config.schedule in ("step", "warmup_step"):
        e = config.epochs
        milestones = [round(0.51 * e), round(0.77 * e)]
        lr *= 0.1 ** sum(epoch >= m for m in milestones if m > 0)
    if config.schedule in ("warmup_step", "warmup_cosine") and epoch == 0:
        frac = (step + 1) / steps_per_epoch
        lr = 1e-6 + (config.lr - 1e-6) * frac
    elif config.schedule == "warmup_cosine":
        done = (epoch - 1) * steps_per_epoch + step
        total = max(1, (config.epochs - 1) * steps_per_epoch)
        lr = 0.5 * config.lr * (1 + math.cos(math.pi * done / total))
    return lr


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


#: Temporary files of :func:`atomic_save`: ``.<name>.<host>.<pid>.<token>.tmp`` in the target's folder.
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8,})\.tmp$")


def hostname() -> str:
    """This machine's name as used in temporary file names (only letters, digits, ``-`` and ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "localhost"


def temp_owner(path: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that writes the temporary file ``path``; ``None`` if unknown."""
    m = _TEMP_NAME.match(Path(path).name)
    return (m["host"], int(m["pid"])) if m else None


def atomic_save(obj: Any, path: Path, saver: Callable[[Any, str], None] | None = None) -> None:
    """Write ``obj`` to ``path`` through a temporary file in the same folder, then rename it.

    The temporary name holds this host, process id and a random token, so that concurrent writers
    never share one and a cleanup can tell a live writer's file from a dead one's. The file gets the
    mode a new file gets under the umask (e.g. 0644 under umask 022), whatever ``saver`` does.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{hostname()}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
    try:
        (saver or torch.save)(obj, str(tmp))
        if os.stat(tmp).st_mode & 0o7777 != mode:  # e.g. safetensors creates its files with 0600
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def _accuracy(model: nn.Module, data: Any, device: torch.device) -> float:
    model.eval()
    correct = 0
    for x, y in data.batches(1000, augment=False, device=device):
        correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(data)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite (too high a learning rate, no gradient clipping)."""


def train(config: TrainConfig, train_data: Any, test_data: Any = None, checkpoint: Path | None = None,
          device: str | torch.device = "cpu", progress: bool = True,
          snapshot_dir: Path | None = None,
          init_state: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train one edge model with ``config``; return it (in eval mode) and its history.

    After every epoch the model, optimizer and history are written atomically to ``checkpoint``;
    a later call with the same checkpoint resumes from the last finished epoch, so an interruption
    loses at most one epoch. Shuffling and augmentation draw from generators seeded by
    ``(seed, epoch)``, so a resumed run gives the same result as an uninterrupted one.
    With ``snapshot_dir``, the weights at initialization and after every epoch are written there
    (:func:`snapshot_path`), and the history records each epoch's ℓ2 distance from initialization.
    ``init_state`` (the trained weights of ``config.init_from``) replaces the random initialization.
    """
    device = torch.device(device)
    if (init_state is None) != (config.init_from is None):
        raise ValueError("a configuration with init_from needs init_state (the foundation's weights), and only then; "
                         "train it through vfnb.get_or_train, which supplies them")
    torch.manual_seed(config.seed)
    kwargs = {**config.model_kwargs, **data_kwargs(config.model, train_data.in_channels,
                                                     train_data.image_size, train_data.num_classes)}
    model = build_model(config.model, **kwargs).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = make_optimizer(config, model)
    history: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "test_acc": []}
    start = 0
    if checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            if state.get("key") != config.key:
                raise ValueError("checkpoint belongs to another configuration")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            history, start = state["history"], int(state["epoch"])
        except Exception as exc:  # a truncated or foreign resume file: start over, loudly
            import warnings
            warnings.warn(f"ignoring unusable resume checkpoint {checkpoint} ({exc}); training from scratch")
            torch.manual_seed(config.seed)
            model = build_model(config.model, **kwargs).to(device)
            if init_state is not None:
                model.load_state_dict(init_state)
            opt = make_optimizer(config, model)
            history, start = {"train_loss": [], "train_acc": [], "test_acc": []}, 0
    if snapshot_dir is not None:
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            save_snapshot(model, snapshot_path(snapshot_dir, 0))
        init = load_file(snapshot_path(snapshot_dir, 0))
        history.setdefault("distance_from_init", [])
    n = len(train_data)
    steps = max(1, -(-n // config.batch_size))
    bar = tqdm(total=config.epochs, initial=start, disable=not progress, leave=False,
               desc=f"train {config.model} seed={config.seed}", unit="epoch")
    for epoch in range(start, config.epochs):
        model.train()
        total_loss, correct = 0.0, 0
        batches = train_data.batches(config.batch_size, shuffle=True, seed=config.seed * 100_003 + epoch,
                                     device=device)
        for step, (x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, epoch, step, steps)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            total_loss += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
        if not math.isfinite(total_loss):
            bar.close()
            raise TrainingDivergedError(
                f"training {config.model} (seed {config.seed}) diverged in epoch {epoch + 1}: the loss became "
                f"{total_loss / n}. Lower the learning rate (lr={config.lr}) or clip gradients "
                "(TrainConfig.grad_clip, e.g. 1.0); nothing of this epoch was saved")
        history["train_loss"].append(total_loss / n)
        history["train_acc"].append(correct / n)
        if test_data is not None:
            history["test_acc"].append(_accuracy(model, test_data, device))
        if snapshot_dir is not None:
            save_snapshot(model, snapshot_path(snapshot_dir, epoch + 1))
            history["distance_from_init"].append(state_distance(model.state_dict(), init))
        if checkpoint is not None:
            atomic_save({"key": config.key, "epoch": epoch + 1, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "history": history}, checkpoint)
        bar.update(1)
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}",
                        acc=f"{(history['test_acc'] or history['train_acc'])[-1]:.3f}")
    bar.close()
    model.eval()
    return model, history


def snapshot_path(folder: Path, epoch: int) -> Path:
    """Where the weights after ``epoch`` epochs live (``0``: at initialization)."""
    return Path(folder) / f"epoch{epoch:04d}.safetensors"


def save_snapshot(model: nn.Module, path: Path) -> None:
    """The model's parameters and buffers, written atomically as safetensors (loading runs no code)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_save(state, path, saver=lambda obj, p: save_file(obj, p))


def state_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The ℓ2 distance between two models' weights: every floating parameter and buffer except norm running
    statistics and counters (appendix A.4, Figure 9)."""
    if set(a) != set(b):
        raise ValueError("state_distance needs two states of one architecture (their keys differ)")
    total = 0.0
    for k, v in a.items():
        if not v.is_floating_point() or k.endswith(("running_mean", "running_var")):
            continue
        total += float(((v.detach().cpu().double() - b[k].detach().cpu().double()) ** 2).sum())
    return math.sqrt(total)


#: Paper Table 2 (appendix A.3): the recipe for each model family on its paper-scale dataset.
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"optimizer": "adam", "lr": 0.01, "schedule": "constant", "batch_size": 128,
            "weight_decay": 1e-4, "epochs": 20},
    "cnn": {"optimizer": "sgd", "lr": 0.1, "schedule": "step", "batch_size": 128,
            "weight_decay": 1e-4, "epochs": 160},
}

#: How the smaller profiles scale the CNN recipe: the paper's learning rate 0.1 with strong weight decay 1e-2 and
#: gradient-norm clipping at 1.0, so that weight matching works at this scale (appendix A.4; the A.4 chapter shows
#: the mechanism). Measured on the cpu VGG16 pair (seeds 0/1, width 0.25, mnist5k, 15 epochs; edges, then WM alone,
#: WM + REPAIR at α = 0.5; direct merging gave 10 % in every row):
#:   lr 0.05, weight decay 5e-3 (the earlier recipe):  edges 97.1 %, WM 12.5 %, WM + REPAIR 58.3 %;
#:   lr 0.05, weight decay 1e-2:                       edges 95.7 %, WM 35.6 %, WM + REPAIR 82.8 %;
#:   lr 0.1,  weight decay 5e-3:                       edges 97.2 %, WM 75.1 %, WM + REPAIR 88.8 %;
#:   lr 0.1,  weight decay 1e-2 (this recipe):         edges 95.7 %, WM 93.1 %, WM + REPAIR 93.3 %.
#: Training moved the weights 49 %, 74 %, 75 % and 94 % from their initialization. The clip stays: without it (or
#: with a clip at 5.0) one of the two seeds diverged to a dead network (chance accuracy), also with a warm-up, and
#: PyTorch's default (Kaiming-uniform) initialization left both at chance.
PROFILE_CNN: dict[str, dict[str, Any]] = {
    "smoke": {"epochs": 1, "lr": 0.1, "weight_decay": 1e-2, "n_train": 512, "width": 0.125, "grad_clip": 1.0},
    "cpu": {"epochs": 15, "lr": 0.1, "weight_decay": 1e-2, "n_train": None, "width": 0.25, "grad_clip": 1.0},
    "paper": {"epochs": 160, "lr": 0.1, "weight_decay": 1e-4, "n_train": None, "width": 1.0},
}


#: Vision transformers (``build_model("vit")``, appendix A.8.4). The paper merges ViTs that Imfeld et al.
#: pre-trained on ImageNet and fine-tuned on CIFAR-10 (93 %); nothing can be downloaded here, so the
#: book trains them from scratch: Adam with step decay, gradient clipping at 1.0, no augmentation.
#: ``cpu``: 3 heads of 32, 4 blocks, 7×7 patches of the 28×28 digits (16 tokens and the class token);
#: measured on mnist5k (4,000 training images, 1,000 test): 20 epochs gave 0.918 and 0.926 for seeds 0 and 1
#: in about 55 s each on two cores, 30 epochs 0.935 and 0.931 (lr 0.002); 4×4 patches (49 tokens) at lr
#: 0.001 reached only 0.872 after 20 epochs, at three times the cost.
#: ``paper``: a 7-block, 6-head ViT of hidden size 384 on CIFAR-10 (4×4 patches), the size of the
#: paper's simplified ViT, trained from scratch for 200 epochs.
TRANSFORMER_RECIPES: dict[str, dict[str, Any]] = {
    "smoke": {"optimizer": "adam", "lr": 0.002, "schedule": "step", "batch_size": 128, "weight_decay": 1e-4,
              "epochs": 1, "n_train": 512, "grad_clip": 1.0,
              "model_kwargs": {"width": 0.5, "depth": 2, "num_heads": 3, "patch_size": 7}},
    "cpu": {"optimizer": "adam", "lr": 0.002, "schedule": "step", "batch_size": 128, "weight_decay": 1e-4,
            "epochs": 20, "n_train": None, "grad_clip": 1.0,
            "model_kwargs": {"width": 1.0, "depth": 4, "num_heads": 3, "patch_size": 7}},
    "paper": {"optimizer": "adam", "lr": 0.001, "schedule": "step", "batch_size": 128, "weight_decay": 1e-4,
              "epochs": 200, "n_train": None, "grad_clip": 1.0,
              "model_kwargs": {"width": 4.0, "depth": 7, "num_heads": 6, "patch_size": 4}},
}

#: ResNet20-LN at the small profiles: learning rate 0.05, batches of 64 and weight decay 5e-4 (not the shared
#: 0.1, 128 and 1e-2).
#: Measured (H100, mnist5k, width 1, 15 epochs, seeds 0-3): with the shared CNN recipe one seed of
#: four stayed at chance and the others reached 0.53-0.80 (on the CPU, seed 0 stayed at chance);
#: lr 0.1, lr 0.01-0.02, no clipping, no warm-up and batches of 32 or 64 alone each left at least
#: one seed at chance; batch 64 with weight decay 5e-4 trained all four seeds to 0.94-0.97.
RESNET_LN_CNN: dict[str, dict[str, Any]] = {
    "smoke": {"lr": 0.05, "batch_size": 64, "weight_decay": 5e-4},
    "cpu": {"lr": 0.05, "batch_size": 64, "weight_decay": 5e-4},
}


def recipe(model: str, profile: str = "cpu", dataset: str | None = None, seed: int = 0,
           **overrides: Any) -> TrainConfig:
    """The training configuration the paper uses for ``model``, scaled to ``profile``.

    MLPs use Adam 0.01 with a constant rate (Table 2); CNNs use SGD with step decay, with a
    linear warm-up for LayerNorm ResNets (appendix A.3); vision transformers use Adam with step decay
    (:data:`TRANSFORMER_RECIPES`, with their sizes). ``overrides`` replace any field, and
    ``model_kwargs`` entries can be given directly (e.g. ``norm="bn"``).
    """
    from .config import PROFILES
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_kwargs = dict(overrides.pop("model_kwargs", {}))
    model_kwargs.update({k: overrides.pop(k) for k in list(overrides) if k not in fields})
    dataset = dataset or ("mnist5k" if profile != "paper" else ("mnist" if model == "mlp" else "cifar10"))
    if model == "mlp":
        base = dict(PAPER_RECIPES["mlp"])
        if profile == "smoke":
            base.update(epochs=1, n_train=512)
    elif model == "vit":
        base = dict(TRANSFORMER_RECIPES[profile])
        for k, v in base.pop("model_kwargs").items():
            model_kwargs.setdefault(k, v)
    else:
        base = dict(PAPER_RECIPES["cnn"])
        scale = dict(PROFILE_CNN[profile])
        model_kwargs.setdefault("width", scale.pop("width"))
        base.update(scale)
        if model == "resnet20" and model_kwargs.get("norm") == "ln":
            base["schedule"] = "warmup_step"
            base.update(RESNET_LN_CNN.get(profile, {}))
    base.update(overrides)
    return TrainConfig(model=model, dataset=dataset, model_kwargs=model_kwargs, seed=seed, **base)
