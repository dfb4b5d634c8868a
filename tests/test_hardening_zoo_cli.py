"""Hardening of the zoo and of ``vfnb train``: concurrent processes, file modes, unusable cache
folders, value validation shared with the chapters, and one-line errors for user mistakes.

Every training is a tiny MLP on the embedded MNIST sample, on the CPU, so each test takes seconds.
Names added by the fixes are looked up inside the tests, so that on the old code each test fails
on its own claim rather than on an import.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import vfnb.data as data_mod
import vfnb.zoo as zoo
from vfnb import cli
from vfnb.config import ConfigError, resolve
from vfnb.train import TrainConfig, recipe
from vfnb.zoo import entry_dir, get_or_train, info, load_entry

ROOT = Path(__file__).resolve().parents[1]
RUN = {"progress": False, "device": "cpu"}


def tiny(seed: int = 0, **overrides) -> TrainConfig:
    kw = {"depth": 3, "width": 8, "n_train": 256, "epochs": 2, **overrides}
    return recipe("mlp", "smoke", seed=seed, **kw)


def boom(*args, **kwargs):
    raise AssertionError("training was started")


def this_host() -> str:
    """The host part of a temporary file name: the host name with only letters, digits, - and _."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "localhost"


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


# --------------------------------------------------------------------------- 3. concurrent processes

# Each child signals that it is ready (torch imported), waits for "go", then asks for the same
# configuration. Training is wrapped to announce itself and to take at least 2 s, so the two
# requests always overlap: without a lock both would train (and race on the entry's files).
_CHILD = textwrap.dedent("""
    import hashlib, json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import vfnb.zoo as zoo
    from vfnb.train import TrainConfig

    cache, cfg, me = Path(sys.argv[1]), TrainConfig.from_dict(json.loads(sys.argv[2])), sys.argv[3]
    real_train = zoo.train

    def slow_train(*args, **kwargs):
        print("TRAINED", flush=True)
        time.sleep(2.0)
        return real_train(*args, **kwargs)

    zoo.train = slow_train
    (cache.parent / f"ready-{me}").touch()
    while not (cache.parent / "go").exists():
        time.sleep(0.01)
    model = zoo.get_or_train(cfg, cache_dir=cache, progress=False, device="cpu")
    blob = b"".join(v.numpy().tobytes() for v in model.state_dict().values())
    print("WEIGHTS", hashlib.sha256(blob).hexdigest(), flush=True)
""")


def test_two_processes_asking_for_one_configuration_both_succeed_and_train_it_once(tmp_path):
    cfg = tiny(21)
    cache = tmp_path / "zoo"
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), json.dumps(cfg.to_dict()), str(i)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "the children did not start"
            assert all(c.poll() is None for c in children), [c.communicate()[1][-2000:] for c in children]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        results = [c.communicate(timeout=240) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.communicate()
    for c, (out, err) in zip(children, results):
        assert c.returncode == 0, f"a concurrent training process failed:\n{err[-3000:]}"
    outs = [out for out, _ in results]
    assert sum(out.count("TRAINED") for out in outs) == 1, outs  # the second waited, then loaded
    hashes = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("WEIGHTS")}
    assert len(hashes) == 1  # both got the same model
    model, meta = load_entry(cfg, cache)
    assert meta["config"] == cfg.to_dict()
    d = entry_dir(cfg, cache)
    assert sorted(os.listdir(d)) == ["meta.json", "model.safetensors"]  # no temporary file is left


def test_a_live_writers_temp_file_is_kept_and_only_stale_ones_are_removed(tmp_path):
    cfg = tiny(22)
    cache = tmp_path / "zoo"
    d = entry_dir(cfg, cache)
    d.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = this_host()
        in_flight = d / f".model.safetensors.{host}.{live.pid}.0123456789abcdef.tmp"
        in_flight.write_bytes(b"half a checkpoint")  # another process is writing it right now
        killed = d / f".resume.pt.{host}.{dead.pid}.fedcba9876543210.tmp"
        killed.write_bytes(b"left by a killed run")
        other_host = d / ".meta.json.some-other-host.4242.00112233aabbccdd.tmp"
        other_host.write_bytes(b"young file of a writer elsewhere")
        ancient = d / ".model.safetensors.k3j_x9a2.tmp"  # tempfile.mkstemp's name, from an older vfnb
        ancient.write_bytes(b"old")
        day_ago = time.time() - 24 * 3600
        os.utime(ancient, (day_ago, day_ago))

        get_or_train(cfg, cache_dir=cache, **RUN)

        assert in_flight.read_bytes() == b"half a checkpoint"  # never delete a live writer's file
        assert other_host.exists()  # unknown writer, but young: kept
        assert not killed.exists() and not ancient.exists()  # dead writer / older than hours: removed
        assert temp_files(d) == sorted([in_flight.name, other_host.name])
        assert load_entry(cfg, cache)[1]["config"] == cfg.to_dict()
    finally:
        live.kill()
        live.wait()


def test_threads_asking_for_one_configuration_train_it_once(tmp_path, monkeypatch):
    """The lock is per open file, so threads of one process (e.g. a Dask worker) also wait."""
    from concurrent.futures import ThreadPoolExecutor

    calls: list[int] = []
    real = zoo.train

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo, "train", counted)
    cfg = tiny(23)
    with ThreadPoolExecutor(3) as pool:
        models = list(pool.map(lambda _: get_or_train(cfg, cache_dir=tmp_path, **RUN), range(3)))
    assert len(calls) == 1
    states = [m.state_dict() for m in models]
    assert all(torch.equal(s[k], states[0][k]) for s in states for k in s)


# --------------------------------------------------------------------------- 4. file modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_zoo_files_respect_the_umask(tmp_path, umask):
    cfg = tiny(24, epochs=1)
    old = os.umask(umask)
    try:
        get_or_train(cfg, cache_dir=tmp_path, **RUN)
    finally:
        os.umask(old)
    d = entry_dir(cfg, tmp_path)
    for name in ("model.safetensors", "meta.json"):
        mode = stat.S_IMODE(os.stat(d / name).st_mode)
        assert mode == 0o666 & ~umask, f"{name} has mode {oct(mode)}, expected {oct(0o666 & ~umask)}"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~umask


def test_atomic_save_gives_the_umask_mode_to_torch_files(tmp_path):
    from vfnb.train import atomic_save

    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.ones(2)}, tmp_path / "resume.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "resume.pt").st_mode) == 0o644
    assert torch.equal(torch.load(tmp_path / "resume.pt", weights_only=True)["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["resume.pt"]


# --------------------------------------------------------------------------- 5. unusable cache folders


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_a_cache_that_is_or_lies_under_a_file_fails_before_training(tmp_path, monkeypatch, where):
    blocker = tmp_path / "zoo"
    blocker.write_text("not a folder")
    cache = blocker if where == "is_a_file" else blocker / "models"
    monkeypatch.setenv("VFNB_CACHE", str(cache))
    monkeypatch.setattr(zoo, "train", boom)
    monkeypatch.setattr(data_mod, "load_dataset", boom)  # not even the data is read
    with pytest.raises(OSError) as err:
        get_or_train(tiny(25), **RUN)
    assert isinstance(err.value, zoo.CacheDirError)
    message = str(err.value)
    assert "VFNB_CACHE" in message and str(cache) in message
    assert f"{blocker} is a file, not a folder" in message
    assert "writable folder" in message  # and how to fix it
    assert blocker.read_text() == "not a folder"  # untouched

    # an explicit cache_dir is named as the source
    monkeypatch.delenv("VFNB_CACHE")
    with pytest.raises(zoo.CacheDirError, match="cache_dir argument"):
        get_or_train(tiny(25), cache_dir=cache, **RUN)


_UNWRITABLE_CHILD = textwrap.dedent("""
    import vfnb.zoo as zoo
    from vfnb.train import recipe

    def boom(*args, **kwargs):
        raise AssertionError("training was started")

    zoo.train = boom
    try:
        zoo.get_or_train(recipe("mlp", "smoke", seed=26, depth=3, width=8, n_train=256), progress=False, device="cpu")
    except Exception as exc:
        print(type(exc).__name__)
        print(exc)
""")


def _drop_dac_override() -> None:
    """In the child, before exec: remove root's power to write where permissions forbid it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_an_unwritable_cache_fails_before_training_with_a_clear_error(tmp_path):
    """A real permission denial on a read-only folder. Tests run as root, who may write anywhere,
    so the child drops that capability (CAP_DAC_OVERRIDE) before it starts."""
    cache = tmp_path / "zoo"
    cache.mkdir()
    os.chmod(cache, 0o555)
    try:
        env = {**os.environ, "VFNB_CACHE": str(cache)}
        try:
            proc = subprocess.run([sys.executable, "-c", _UNWRITABLE_CHILD], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=240,
                                  preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot drop root's CAP_DAC_OVERRIDE here ({exc})")
        assert proc.returncode == 0, proc.stderr[-3000:]
        kind, message = proc.stdout.split("\n", 1)
        assert kind == "CacheDirError", proc.stdout
        assert "VFNB_CACHE" in message and str(cache) in message
        assert "Permission denied" in message and "writable folder" in message
        assert os.listdir(cache) == []  # nothing was written
    finally:
        os.chmod(cache, 0o755)


# --------------------------------------------------------------------------- 6. one validation for CLI and chapters


def _chapter_message(name: str, value) -> str:
    """The message a chapter's parameters cell gives for ``name=value`` (any chapter that takes it)."""
    from vfnb.config import EXPERIMENTS

    experiment = next(e for e, profiles in EXPERIMENTS.items() if name in profiles["smoke"])
    with pytest.raises(ConfigError) as err:
        resolve(experiment, "smoke", **{name: value})
    return str(err.value)


@pytest.mark.parametrize("args, name, value", [
    (["--epochs", "0"], "epochs", 0),
    (["--epochs", "5000"], "epochs", 5000),
    (["--seed", "-1"], "seed", -1),
    (["--dataset", "svhn"], "dataset", "svhn"),
])
def test_train_cli_rejects_bad_values_with_the_chapters_message(capsys, monkeypatch, args, name, value):
    monkeypatch.setattr(zoo, "get_or_train", boom)
    monkeypatch.setattr(zoo, "train", boom)
    code = cli.main(["train", "--model", "mlp", "--profile", "smoke", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {_chapter_message(name, value)}\n"


def test_train_config_rejects_a_negative_seed():
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        TrainConfig(model="mlp", seed=-1)


def test_train_cli_passes_explicit_epochs_and_trains_into_the_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VFNB_CACHE", str(tmp_path))
    assert cli.main(["train", "--model", "mlp", "--profile", "smoke", "--seed", "3", "--epochs", "2"]) == 0
    cfg = recipe("mlp", "smoke", seed=3, epochs=2)
    assert info(cfg)["config"]["epochs"] == 2
    out = capsys.readouterr().out
    assert out.startswith(str(entry_dir(cfg))) and "test accuracy" in out


# --------------------------------------------------------------------------- 7. user errors: one line, exit 2


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet99"], "'resnet99'"),
    (["--model", "mlp", "--profile", "laptop"], "'laptop'"),
    (["--model", "mlp", "--profile", "smoke", "--dataset", "svhn"], "'svhn'"),
    (["--model", "mlp", "--profile", "smoke", "--seed", "-1"], "'seed' = -1"),
])
def test_train_cli_user_errors_print_one_line_and_exit_2(capsys, monkeypatch, args, needle):
    monkeypatch.setattr(zoo, "get_or_train", boom)
    assert cli.main(["train", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err


def test_train_cli_unwritable_cache_and_missing_dataset_are_user_errors(capsys, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("VFNB_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr(zoo, "train", boom)
    assert cli.main(["train", "--model", "mlp", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "VFNB_CACHE" in err and len(err.splitlines()) == 1

    monkeypatch.setenv("VFNB_CACHE", str(tmp_path / "zoo"))
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--model", "mlp", "--profile", "paper", "--data-root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'mnist' not found") and "Traceback" not in err


def test_train_cli_real_bugs_still_raise(monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(zoo, "get_or_train", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["train", "--model", "mlp", "--profile", "smoke"])


def test_python_m_vfnb_train_unknown_model_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "vfnb", "train", "--model", "vgg99", "--profile", "smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: parameter 'model' = 'vgg99' is not allowed: it must be one of mlp, vgg11, vgg13, vgg16, vgg19, "
        "resnet20, vit, convnext, mobilenet"], proc.stderr
    assert proc.stdout == ""
