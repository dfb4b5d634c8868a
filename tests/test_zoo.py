"""Tests for vfnb.train and vfnb.zoo: the on-disk model cache, its integrity checks, safe loading,
exact resumption after a kill, configuration validation and the learning-rate schedules.

Every training here is a tiny MLP on the embedded MNIST sample, on the CPU; each claim is
checked against a fact computed independently of the code under test (a second training in a
fresh folder, hashlib on the file bytes, a hand-counted accuracy, the paper's epoch numbers).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vfnb
import vfnb.data as data_mod
import vfnb.zoo as zoo
from vfnb.data import VisionData, load_dataset
from vfnb.models import build_model
from vfnb.train import TrainConfig, learning_rate, recipe, train
from vfnb.zoo import CorruptCheckpointError, entry_dir, get_or_train, info, load_entry

ROOT = Path(__file__).resolve().parents[1]
RUN = {"progress": False, "device": "cpu"}


def tiny(seed: int = 0, **overrides) -> TrainConfig:
    kw = {"depth": 3, "width": 8, "n_train": 256, "epochs": 2, **overrides}
    return recipe("mlp", "smoke", seed=seed, **kw)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            diff = (a[k] - b[k]).abs().max().item()
            assert diff <= atol, f"{k} differs by {diff}"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def copy_entry(config: TrainConfig, src_cache: Path, dst_cache: Path) -> Path:
    """Copy a trained entry into another cache (so a test may damage its own copy)."""
    dst = entry_dir(config, dst_cache)
    shutil.copytree(entry_dir(config, src_cache), dst)
    return dst


class Zoo:
    """Two trained tiny models (seeds 0 and 1) in one cache, with their reference weights."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.a, self.b = tiny(0), tiny(1)
        self.wa = weights(get_or_train(self.a, cache_dir=cache, **RUN))
        self.wb = weights(get_or_train(self.b, cache_dir=cache, **RUN))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def spy_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the epoch of every shuffled (i.e. training) pass over the data.

    ``train`` shuffles epoch ``e`` of seed ``s`` with ``seed = s * 100_003 + e``; the list holds
    the raw seeds, in call order.
    """
    seen: list[int] = []
    original = VisionData.batches

    def batches(self, batch_size, shuffle=False, seed=None, *args, **kwargs):
        if shuffle:
            seen.append(seed)
        return original(self, batch_size, shuffle, seed, *args, **kwargs)

    monkeypatch.setattr(VisionData, "batches", batches)
    return seen


# --------------------------------------------------------------------------- cache hits and files


def test_second_call_trains_nothing_and_returns_the_same_weights(trained, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(zoo, "train", boom)
    monkeypatch.setattr(data_mod, "load_dataset", boom)  # not even the data is read
    again = get_or_train(trained.a, cache_dir=trained.cache, **RUN)
    assert not again.training  # returned in eval mode
    assert_same(weights(again), trained.wa)
    assert_same(weights(load_entry(trained.a, trained.cache)[0]), trained.wa)


def test_entry_files_and_metadata(trained):
    cfg = trained.a
    d = entry_dir(cfg, trained.cache)
    assert d.parent == trained.cache and d.name.startswith(f"mlp-mnist5k-s0-{cfg.key}")
    # exactly the two files: no resume.pt, no temporary files (hidden ones included)
    assert sorted(os.listdir(d)) == ["meta.json", "model.safetensors"]

    meta = json.loads((d / "meta.json").read_text())
    assert meta == info(cfg, trained.cache)
    assert meta["format"] == "vfnb-zoo-1"
    assert meta["config"] == cfg.to_dict() and TrainConfig.from_dict(meta["config"]) == cfg
    assert meta["key"] == cfg.key
    assert meta["sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["vfnb"] == vfnb.__version__
    assert {"numpy", "python"} <= set(meta["versions"])
    assert meta["model_kwargs"] == {"depth": 3, "width": 8, "in_features": 784, "num_classes": 10}
    assert all(len(meta["history"][k]) == cfg.epochs for k in ("train_loss", "train_acc", "test_acc"))

    # the weights file is plain safetensors holding the returned weights
    assert_same(load_file(str(d / "model.safetensors")), trained.wa)

    # the stored test accuracy is the accuracy of those weights on the whole mnist5k test split
    model = build_model("mlp", **meta["model_kwargs"])
    model.load_state_dict(trained.wa)
    x, y = load_dataset("mnist5k", "test").tensors()
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert meta["metrics"]["test_accuracy"] == pytest.approx(correct / len(y), abs=1e-12)
    assert meta["metrics"]["test_accuracy"] > 0.3  # it did learn something (chance is 0.1)
    assert meta["metrics"]["train_loss"] == meta["history"]["train_loss"][-1]
    assert math.isfinite(meta["metrics"]["train_loss"]) and meta["metrics"]["train_loss"] > 0


def test_missing_entry_and_bad_arguments(tmp_path):
    cfg = tiny(5)
    with pytest.raises(FileNotFoundError):
        load_entry(cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match="get_or_train"):
        info(cfg, tmp_path)
    with pytest.raises(TypeError, match="TrainConfig"):
        get_or_train(cfg.to_dict(), cache_dir=tmp_path, **RUN)
    with pytest.raises(ValueError, match="n_train=99999"):
        get_or_train(cfg.replace(n_train=99999), cache_dir=tmp_path, **RUN)


def test_cache_dir_defaults_to_vfnb_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VFNB_CACHE", str(tmp_path / "envcache"))
    assert entry_dir(tiny()).parent == tmp_path / "envcache"
    assert entry_dir(tiny(), tmp_path / "explicit").parent == tmp_path / "explicit"


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_weights_different_seed_different_weights(trained, tmp_path):
    again = weights(get_or_train(trained.a, cache_dir=tmp_path, **RUN))
    assert_same(again, trained.wa)
    assert (entry_dir(trained.a, tmp_path) / "model.safetensors").read_bytes() == \
        (entry_dir(trained.a, trained.cache) / "model.safetensors").read_bytes()
    assert max_diff(trained.wa, trained.wb) > 1e-2
    assert trained.a.key != trained.b.key
    assert entry_dir(trained.a, tmp_path) != entry_dir(trained.b, tmp_path)


# --------------------------------------------------------------------------- corrupt and foreign entries


def test_truncated_weights_are_detected_and_retrained(trained, tmp_path):
    d = copy_entry(trained.a, trained.cache, tmp_path)
    w = d / "model.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_entry(trained.a, tmp_path)
    with pytest.warns(UserWarning, match="corrupt"):
        model = get_or_train(trained.a, cache_dir=tmp_path, **RUN)
    assert_same(weights(model), trained.wa)  # retrained, deterministically
    assert_same(weights(load_entry(trained.a, tmp_path)[0]), trained.wa)  # and the entry is whole again
    assert sorted(os.listdir(d)) == ["meta.json", "model.safetensors"]


def _random_bytes(d: Path, zoo_: Zoo) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _other_seeds_weights(d: Path, zoo_: Zoo) -> None:
    shutil.copy2(entry_dir(zoo_.b, zoo_.cache) / "model.safetensors", d / "model.safetensors")


def _other_seeds_meta(d: Path, zoo_: Zoo) -> None:
    shutil.copy2(entry_dir(zoo_.b, zoo_.cache) / "meta.json", d / "meta.json")


def _other_seeds_whole_entry(d: Path, zoo_: Zoo) -> None:
    _other_seeds_meta(d, zoo_)
    _other_seeds_weights(d, zoo_)  # consistent with each other, but for seed 1


def _meta_not_json(d: Path, zoo_: Zoo) -> None:
    (d / "meta.json").write_bytes(b"\x00\xffnot json{")


def _meta_other_format(d: Path, zoo_: Zoo) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta["format"] = "something-else"
    (d / "meta.json").write_text(json.dumps(meta))


def _meta_json_array(d: Path, zoo_: Zoo) -> None:
    (d / "meta.json").write_text("[1, 2, 3]")


def _meta_without_model_kwargs(d: Path, zoo_: Zoo) -> None:
    meta = json.loads((d / "meta.json").read_text())
    del meta["model_kwargs"]
    (d / "meta.json").write_text(json.dumps(meta))


def _weights_missing(d: Path, zoo_: Zoo) -> None:
    (d / "model.safetensors").unlink()


def _weights_of_another_architecture(d: Path, zoo_: Zoo) -> None:
    """Valid safetensors with a matching checksum in meta, but shapes of a wider MLP."""
    other = build_model("mlp", depth=3, width=16)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(d / "model.safetensors"))
    meta = json.loads((d / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (_random_bytes, "checksum"),
    (_other_seeds_weights, "checksum"),
    (_other_seeds_meta, "another configuration"),
    (_other_seeds_whole_entry, "another configuration"),
    (_meta_not_json, "not valid JSON"),
    (_meta_other_format, "not a vfnb zoo entry"),
    (_meta_json_array, "not a vfnb zoo entry"),
    (_meta_without_model_kwargs, "does not fit"),
    (_weights_missing, "missing"),
    (_weights_of_another_architecture, "does not fit"),
])
def test_foreign_or_damaged_entries_are_never_used(trained, tmp_path, damage, message):
    d = copy_entry(trained.a, trained.cache, tmp_path)
    damage(d, trained)
    with pytest.raises(CorruptCheckpointError, match=message):
        load_entry(trained.a, tmp_path)
    with pytest.warns(UserWarning, match="corrupt zoo entry"):
        model = get_or_train(trained.a, cache_dir=tmp_path, **RUN)
    assert_same(weights(model), trained.wa)
    assert max_diff(weights(model), trained.wb) > 1e-2  # seed 1's weights were not passed off as seed 0's
    assert info(trained.a, tmp_path)["config"] == trained.a.to_dict()
    assert_same(weights(load_entry(trained.a, tmp_path)[0]), trained.wa)


# --------------------------------------------------------------------------- loading runs no code


class _Payload:
    """Unpickling this runs ``exec`` (it would create ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _pickled_code(path: Path, cfg: TrainConfig, tmp: Path) -> None:
    torch.save({"key": cfg.key, "epoch": 1, "payload": _Payload(tmp / "executed")}, path)


def _truncated(path: Path, cfg: TrainConfig, tmp: Path) -> None:
    model = build_model("mlp", depth=3, width=8)
    torch.save({"key": cfg.key, "epoch": 1, "model": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:100])


def _foreign_key(path: Path, cfg: TrainConfig, tmp: Path) -> None:
    """A well-formed resume file of another configuration (seed 1), one epoch in."""
    other = tiny(1)
    model = build_model("mlp", depth=3, width=8, in_features=784, num_classes=10)
    opt = torch.optim.Adam(model.parameters())
    torch.save({"key": other.key, "epoch": 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "history": {"train_loss": [9.0], "train_acc": [0.0], "test_acc": [0.0]}}, path)


def test_pickle_payload_is_live(tmp_path):
    """Sanity check for the next test: an unsafe ``torch.load`` of the payload runs code."""
    path = tmp_path / "evil.pt"
    _pickled_code(path, tiny(), tmp_path)
    assert not (tmp_path / "executed").exists()
    torch.load(path, weights_only=False)
    assert (tmp_path / "executed").exists()


@pytest.mark.parametrize("make_resume", [_pickled_code, _truncated, _foreign_key])
def test_unusable_resume_file_is_ignored_with_a_warning(trained, tmp_path, make_resume):
    cache = tmp_path / "cache"
    d = entry_dir(trained.a, cache)
    d.mkdir(parents=True)
    make_resume(d / "resume.pt", trained.a, tmp_path)
    with pytest.warns(UserWarning, match="ignoring unusable resume checkpoint"):
        model = get_or_train(trained.a, cache_dir=cache, **RUN)
    assert not (tmp_path / "executed").exists()  # the pickled code never ran
    assert_same(weights(model), trained.wa)  # trained from scratch
    assert info(trained.a, cache)["history"] == info(trained.a, trained.cache)["history"]
    assert sorted(os.listdir(d)) == ["meta.json", "model.safetensors"]


# --------------------------------------------------------------------------- interrupted training

KILL_CONFIG = dict(depth=3, width=64, n_train=1024, batch_size=16, epochs=6)

# One thread in the child and in this process: results do not depend on the thread count, and a
# busy machine (other test runs on the same two cores) slows the test down far less.
_CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from vfnb.train import TrainConfig
from vfnb.zoo import get_or_train
get_or_train(TrainConfig.from_dict(json.loads(sys.argv[2])), cache_dir=sys.argv[1], progress=False, device="cpu")
"""


def _resume_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # not there yet (or, in theory, caught mid-replace): poll again
        return None


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path, spy_batches, one_thread):
    cfg = tiny(3, **KILL_CONFIG)
    cache = tmp_path / "killed"
    resume = entry_dir(cfg, cache) / "resume.pt"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), json.dumps(cfg.to_dict())],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            epoch = _resume_epoch(resume)
            if epoch is not None and 1 <= epoch < cfg.epochs:
                child.send_signal(signal.SIGKILL)
                killed_at = epoch
                break
            time.sleep(0.02)
    finally:
        if child.poll() is None and killed_at is None:
            child.kill()
        _, err = child.communicate(timeout=60)
    if killed_at is None:
        if child.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"training subprocess failed ({child.returncode}):\n{err.decode()[-3000:]}")
        pytest.skip("the training subprocess finished (or timed out) before it could be killed mid-run")
    assert child.returncode == -signal.SIGKILL
    assert not (entry_dir(cfg, cache) / "meta.json").exists()
    start = _resume_epoch(resume)  # the child may have finished one more epoch before the signal landed
    assert start is not None and killed_at <= start < cfg.epochs

    model = get_or_train(cfg, cache_dir=cache, **RUN)
    epochs_trained = [s - cfg.seed * 100_003 for s in spy_batches]
    assert epochs_trained == list(range(start, cfg.epochs))  # resumed: only the remaining epochs
    assert not resume.exists()

    spy_batches.clear()
    reference = get_or_train(cfg, cache_dir=tmp_path / "uninterrupted", **RUN)
    assert [s - cfg.seed * 100_003 for s in spy_batches] == list(range(cfg.epochs))
    assert_same(weights(model), weights(reference), atol=1e-6)
    h_killed, h_ref = info(cfg, cache)["history"], info(cfg, tmp_path / "uninterrupted")["history"]
    for k in h_ref:
        assert h_killed[k] == pytest.approx(h_ref[k], abs=1e-6)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("bad, message", [
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"schedule": "cosine"}, "unknown schedule"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"seed": -1}, "seed"),
])
def test_train_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="mlp", **bad)
    with pytest.raises(ValueError, match=message):
        tiny().replace(**bad)


def test_from_dict_round_trip_and_unknown_field():
    cfg = tiny(4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()).key == cfg.key
    with pytest.raises(ValueError, match="unknown field.*colour"):
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_key_is_stable_and_sensitive():
    a = recipe("mlp", "smoke", depth=3, width=8)
    b = recipe("mlp", "smoke", width=8, depth=3)  # model_kwargs order does not matter
    assert a.key == b.key and len(a.key) == 20
    assert a.replace(seed=1).key != a.key
    assert a.replace(lr=0.02).key != a.key
    assert recipe("mlp", "smoke", depth=3, width=9).key != a.key


def test_recipe_profiles():
    with pytest.raises(ValueError, match="unknown profile"):
        recipe("mlp", "huge")
    mlp = recipe("mlp", "cpu")  # paper Table 2
    assert (mlp.optimizer, mlp.lr, mlp.schedule, mlp.batch_size, mlp.weight_decay) == \
        ("adam", 0.01, "constant", 128, 1e-4)
    assert recipe("mlp", "paper").dataset == "mnist" and recipe("vgg11", "paper").dataset == "cifar10"
    assert recipe("resnet20", "cpu", norm="ln").schedule == "warmup_step"
    assert recipe("resnet20", "cpu", norm="bn").schedule == "step"
    assert recipe("vgg11", "paper").epochs == 160
    assert recipe("mlp", "smoke", epochs=7).epochs == 7


def test_grad_clip_is_in_the_key_only_when_set():
    """Configurations from before ``grad_clip`` existed keep their zoo keys; a clip changes the key."""
    a = recipe("mlp", "smoke")
    assert a.grad_clip is None and "grad_clip" not in a.to_dict()
    assert a.replace(grad_clip=1.0).key != a.key
    assert TrainConfig.from_dict(a.replace(grad_clip=1.0).to_dict()).grad_clip == 1.0
    assert recipe("vgg16", "cpu").grad_clip == 1.0 and recipe("vgg16", "paper").grad_clip is None


def test_grad_clip_bounds_the_first_sgd_step():
    """With plain SGD (no momentum, no weight decay) the first step moves the parameters by
    lr·‖∇‖; clipping caps that at lr·clip, whatever the learning rate."""
    data = load_dataset("mnist5k", "train").subset(range(64))
    base = TrainConfig(model="mlp", model_kwargs={"depth": 2, "width": 16}, epochs=1, lr=10.0, momentum=0.0,
                       weight_decay=0.0, batch_size=64, schedule="constant", n_train=64)
    torch.manual_seed(0)
    init = build_model("mlp", depth=2, width=16, in_features=784, num_classes=10)
    moved = {}
    for clip in (None, 0.5):
        model, _ = train(base.replace(grad_clip=clip), data, progress=False)
        moved[clip] = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), init.parameters())))
    assert moved[0.5].item() == pytest.approx(10.0 * 0.5, rel=1e-4)
    assert moved[None].item() > 10.0 * 0.5 * 2


# --------------------------------------------------------------------------- learning-rate schedules


@pytest.mark.parametrize("epochs, first, second", [
    (160, 82, 123),  # the paper: decay at epochs 82 and 123 of 160
    (100, 51, 77),
    (10, 5, 8),
])
@pytest.mark.parametrize("schedule", ["step", "warmup_step"])
def test_step_decay_drops_tenfold_twice(epochs, first, second, schedule):
    cfg = TrainConfig(model="vgg11", epochs=epochs, lr=0.1, schedule=schedule)
    for epoch in range(1, epochs):  # epoch 0 of warmup_step is checked below
        expected = 0.1 if epoch < first else 0.01 if epoch < second else 0.001
        for step in (0, 5, 9):
            assert learning_rate(cfg, epoch, step, 10) == pytest.approx(expected, rel=1e-12)


def test_warmup_ramps_linearly_from_1e_6_over_the_first_epoch():
    steps, lr = 50, 0.1
    cfg = TrainConfig(model="resnet20", epochs=20, lr=lr, schedule="warmup_step")
    ramp = [learning_rate(cfg, 0, s, steps) for s in range(steps)]
    slope = (lr - 1e-6) / steps
    for s, value in enumerate(ramp):  # the line through (-1, 1e-6) and (steps - 1, lr)
        assert value == pytest.approx(1e-6 + slope * (s + 1), rel=1e-9)
    assert ramp[-1] == pytest.approx(lr, rel=1e-12)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert learning_rate(cfg, 1, 0, steps) == pytest.approx(lr, rel=1e-12)  # no ramp after epoch 0


def test_constant_schedule_stays_constant():
    cfg = TrainConfig(model="mlp", epochs=30, lr=0.01, schedule="constant", optimizer="adam")
    assert {learning_rate(cfg, e, s, 7) for e in range(30) for s in range(7)} == {0.01}


def test_a_diverged_training_raises_and_leaves_no_entry(tmp_path):
    from vfnb.train import TrainingDivergedError
    cfg = tiny(7, lr=1e30)
    with pytest.raises(TrainingDivergedError, match="grad_clip"):
        get_or_train(cfg, cache_dir=tmp_path, **RUN)
    with pytest.raises(FileNotFoundError):
        load_entry(cfg, tmp_path)
