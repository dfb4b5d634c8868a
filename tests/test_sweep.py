"""``vfnb sweep``: grids, validation before anything runs, Dask execution, skipping, failures, killed workers, the
shared zoo's lock, and the gathered tables."""
from __future__ import annotations

import csv
import json
import warnings
import subprocess
import sys

import pytest
import yaml

from conftest import FIXTURES, ROOT
from vfnb import book, results, sweep
from vfnb.config import Config, ConfigError

POINT = FIXTURES / "sweep_point.ipynb"


# --------------------------------------------------------------------------- grids (no notebook runs)
def test_axes_and_products():
    assert sweep.parse_axis("alpha=[0.25, 0.5]") == ("alpha", [0.25, 0.5])
    assert sweep.parse_axis("seeds=[[0, 1], [2, 3]]") == ("seeds", [[0, 1], [2, 3]])
    for bad, message in (("alpha", "NAME="), ("alpha=0.5", "-p alpha 0.5"), ("alpha=[]", "non-empty list"),
                         ("2x=[1]", "NAME=")):
        with pytest.raises(sweep.SweepError, match=message):
            sweep.parse_axis(bad)
    points = sweep.expand({"a": [1, 2], "b": ["x", "y"]}, {"c": 0})
    assert points == [{"c": 0, "a": 1, "b": "x"}, {"c": 0, "a": 1, "b": "y"},
                      {"c": 0, "a": 2, "b": "x"}, {"c": 0, "a": 2, "b": "y"}]
    assert len({sweep.point_id(p) for p in points}) == 4
    assert sweep.point_id({"a": 1, "b": 2}) == sweep.point_id({"b": 2, "a": 1})  # order does not matter
    with pytest.raises(sweep.SweepError, match="both fixed"):
        sweep.expand({"a": [1]}, {"a": 2})
    with pytest.raises(sweep.SweepError, match="same parameter set"):
        sweep.expand(None, None, [{"a": 1}, {"a": 1}])
    assert sweep.expand({"a": [1]}, None, [{"b": 1}, {"b": 2}]) == [{"a": 1, "b": 1}, {"a": 1, "b": 2}]


def test_sweep_file(tmp_path):
    spec = tmp_path / "s.yml"
    spec.write_text("chapter: '04'\nprofile: smoke\nparameters: {n_alphas: 3}\ngrid: {alpha: [0.25, 0.5]}\n")
    chapter, grid, params, points, profile = sweep.sweep_spec(None, str(spec), ["seeds=[[0, 1], [2, 3]]"], {}, None)
    assert (chapter, profile, params) == ("04", "smoke", {"n_alphas": 3})
    assert grid == {"alpha": [0.25, 0.5], "seeds": [[0, 1], [2, 3]]} and points == []
    with pytest.raises(sweep.SweepError, match="fixed both"):
        sweep.sweep_spec(None, str(spec), [], {"n_alphas": 5}, None)
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.sweep_spec(None, str(spec), ["alpha=[0.1]"], {}, None)
    spec.write_text("grid: {alpha: 0.5}\n")
    with pytest.raises(sweep.SweepError, match="non-empty list"):
        sweep.load_grid(spec)
    spec.write_text("grids: {alpha: [0.5]}\n")
    with pytest.raises(sweep.SweepError, match="unknown key"):
        sweep.load_grid(spec)


def test_a_bad_value_is_rejected_before_anything_runs(tmp_path):
    """Every point is validated first, with the message ``vfnb run`` gives for that value."""
    with pytest.raises(ConfigError) as run_error:
        book.validate_run(book.resolve_chapter("04"), {"profile": "smoke", "alpha": 7.0})
    with pytest.raises(sweep.SweepError) as err:
        sweep.sweep("04", {"alpha": [0.5, 7.0]}, profile="smoke", out=tmp_path / "out", progress=False)
    text = str(err.value)
    assert "grid point 1" in text and "alpha=7.0" in text and str(run_error.value) in text
    assert "grid point 0" not in text
    assert not (tmp_path / "out").exists(), "nothing may be written before every point is valid"
    with pytest.raises(sweep.SweepError, match="unknown parameter"):
        sweep.sweep("04", {"not_a_parameter": [1, 2]}, profile="smoke", out=tmp_path / "out", progress=False)
    # the command line: one line on stderr, exit status 2
    proc = subprocess.run([sys.executable, "-m", "vfnb", "sweep", "04", "--profile", "smoke", "-g", "alpha=[0.5, 7]",
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "grid point 1" in proc.stderr and "alpha" in proc.stderr


def test_record_table_checks_its_rows(tmp_path):
    cfg = Config("sweep_point", {"profile": "smoke", "x": 1.0})
    results.record_table(cfg, "t", [{"m": "a", "acc": 0.5, "n": None}], index="m", results_dir=tmp_path)
    data = results.load("sweep_point", "smoke", tmp_path)
    assert results.tables(data)["t"] == {"kind": "table", "index": ["m"], "percent": True,
                                         "rows": [{"m": "a", "acc": 0.5, "n": None}]}
    with pytest.raises(ValueError, match="holds '50 %'"):
        results.record_table(cfg, "t", [{"m": "a", "acc": "50 %"}], index="m", results_dir=tmp_path)
    with pytest.raises(ValueError, match="same label"):
        results.record_table(cfg, "t", [{"m": "a", "acc": 1.0}, {"m": "a", "acc": 2.0}], index="m", results_dir=tmp_path)
    with pytest.raises(ValueError, match="lacks the index"):
        results.record_table(cfg, "t", [{"acc": 1.0}], index="m", results_dir=tmp_path)


def test_summary_in_the_tables_layout():
    rows = [{"x": 1, "seed": s, "status": "done", "t: a | v": 0.5 + 0.1 * s, "claims: c | holds here": h}
            for s, h in ((0, "yes"), (1, "yes"), (2, "no"))]
    rows.append({"x": 1, "seed": 3, "status": "failed"})  # failed points are left out
    summary = results.summarize(rows, ["x", "seed"])
    cell = next(s for s in summary if s["table"] == "t")
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(0.0816497, rel=1e-5)
    claim = next(s for s in summary if s["table"] == "claims")
    assert claim["values"] == "yes ×2, no ×1" and claim["mean"] is None
    layout = results.summary_tables(summary, percent=["t"])
    assert layout[("x=1", "t")] == [{"": "a", "v": "60.00 ± 8.16", "n": "3"}]
    # a row without some column (Table 1's edge rows have no AM columns): blank cells, n stays last
    wide = results.summary_tables(results.summarize(
        [{"x": 1, "seed": 0, "status": "done", "t: a | v": 0.5}, {"x": 1, "seed": 0, "status": "done",
                                                                  "t: b | v": 0.1, "t: b | w": 0.2}], ["x", "seed"]))
    assert [list(r) for r in wide[("x=1", "t")]] == [["", "v", "w", "n"]] * 2 and wide[("x=1", "t")][0]["w"] == ""


# --------------------------------------------------------------------------- sweeps on a 2-worker LocalCluster
@pytest.mark.slow
def test_four_point_smoke_sweep_and_a_rerun_that_skips(tmp_path):
    """A real chapter at smoke on 2 workers: one row per point, the claims and parameters in results.csv and
    results.parquet; the rerun skips all four and rewrites the same table."""
    out = tmp_path / "sweep"
    res = sweep.sweep("04", {"seeds": [[0, 1], [2, 3]], "alpha": [0.25, 0.5]}, profile="smoke", out=out,
                      workers=2, progress=False)
    assert [r["status"] for r in res.rows] == ["done"] * 4 and res.skipped == 0
    assert len({r["worker"] for r in res.rows}) == 2, "both workers should have run points"
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["seeds"], r["alpha"]) for r in table] == [("[0, 1]", "0.25"), ("[0, 1]", "0.5"),
                                                         ("[2, 3]", "0.25"), ("[2, 3]", "0.5")]
    assert any(c.startswith("claims: ") for c in table[0])
    for r in res.rows:
        folder = out / "points" / r["point"]
        assert (folder / "chapter.ipynb").is_file() and not list(folder.glob(".partial-*"))
    import pyarrow.parquet as pq
    frame = pq.read_table(out / "results.parquet")
    assert frame.num_rows == 4 and frame.schema.field("alpha").type == "double"
    assert "claims" in (out / "summary.md").read_text()
    provenance = json.loads((out / "sweep.json").read_text())["runs"][-1]
    assert {"commit", "device", "date", "vfnb", "points run"} <= set(provenance)
    assert all(r["device"].startswith("cpu") and r["commit"] for r in table)
    before = (out / "results.csv").read_text()
    for notebook in out.glob("points/*/chapter.ipynb"):  # as in a fresh clone of committed results
        notebook.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sweep.StalePointsWarning)  # same code: nothing may be called stale
        again = sweep.sweep("04", {"seeds": [[0, 1], [2, 3]], "alpha": [0.25, 0.5]}, profile="smoke", out=out,
                            progress=False)
    assert again.skipped == 4 and [r["status"] for r in again.rows] == ["done"] * 4
    assert (out / "results.csv").read_text() == before
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 2, "each call is kept in the history"
    record = out / "points" / res.rows[0]["point"] / "point.json"  # as if computed by another vfnb
    record.write_text(record.read_text().replace('"code": "', '"code": "0'))
    with pytest.warns(sweep.StalePointsWarning, match=f"1 finished point.*{res.rows[0]['point']}"):
        sweep.sweep("04", {"seeds": [[0, 1], [2, 3]], "alpha": [0.25, 0.5]}, profile="smoke", out=out, progress=False)


@pytest.mark.slow
def test_failures_are_reported_and_a_killed_worker_is_survived(tmp_path):
    """Point x=3 raises: it is reported with its error, the others finish and the command exits with status 1.
    Point x=2 kills its Dask worker the first time it runs: Dask runs it again elsewhere and the sweep completes.
    A rerun skips the finished points and retries only the failure."""
    out = tmp_path / "sweep"
    marker = tmp_path / "killed-once"
    points = [{"x": 1.0}, {"x": 2.0, "kill_worker_once": str(marker)}, {"x": 3.0, "fail": True}, {"x": 4.0}]
    spec = tmp_path / "sweep.yml"  # through the command line: a sweep file, -g, and the exit status
    spec.write_text(yaml.safe_dump({"points": points}))
    proc = subprocess.run([sys.executable, "-m", "vfnb", "sweep", str(POINT), "--grid", str(spec), "-g", "seed=[0e0]",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "3/4 points done" in proc.stderr and "RuntimeError: point x=3.0 fails on purpose" in proc.stderr
    assert marker.exists(), "the worker was not killed"
    assert "--no-progress" in json.loads((out / "sweep.json").read_text())["runs"][0]["command"]
    res = sweep.sweep(POINT, {"seed": [0.0]}, points=[p for p in points if p["x"] != 3.0], out=out, progress=False)
    assert res.skipped == 3, "-g items are typed like -p values (0e0 is the float 0.0), so the points match"
    res = sweep.sweep(POINT, {"seed": [0.0]}, points=points, out=out, workers=1, progress=False)  # retries x=3
    assert res.skipped == 3 and len(res.failures) == 1
    status = {r["x"]: (r["status"], r["error"]) for r in res.rows}
    assert status[3.0] == ("failed", "RuntimeError: point x=3.0 fails on purpose")
    failed_nb = out / "points" / sweep.point_id({"seed": 0.0, **points[2]}) / "failed.ipynb"
    assert "fails on purpose" in failed_nb.read_text(), "the failed notebook is kept, with its traceback"
    assert all(status[x] == ("done", "") for x in (1.0, 2.0, 4.0))
    killed = next(r for r in res.rows if r["x"] == 2.0)
    assert killed["scores: a | value"] == 2.0
    assert [r["point"] for r in res.failures] == [sweep.point_id({"seed": 0.0, **points[2]})]


def _train_tiny(cache: str, log: str) -> str:
    """On a worker: get one tiny edge model from the shared zoo, logging every time it is actually trained."""
    import hashlib
    import time

    import vfnb.zoo as zoo
    from vfnb.train import recipe

    original = zoo._train_entry

    def logged(*args, **kwargs):
        time.sleep(2.0)  # long enough for the other worker to find the entry missing and wait on the lock
        model = original(*args, **kwargs)
        with open(log, "a") as fh:
            fh.write(f"trained {time.time()}\n")
        return model

    zoo._train_entry = logged
    with open(log, "a") as fh:
        fh.write(f"asked {time.time()}\n")
    model = zoo.get_or_train(recipe("mlp", "smoke", seed=11, depth=2, width=8, n_train=128, epochs=1),
                             cache_dir=cache, progress=False)
    return hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values())).hexdigest()


@pytest.mark.slow
def test_two_workers_asking_for_one_edge_model_train_it_once(tmp_path):
    from distributed import Client, LocalCluster

    log = tmp_path / "log"
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        futures = [client.submit(_train_tiny, str(tmp_path / "zoo"), str(log), pure=False, workers=[w])
                   for w in list(client.scheduler_info()["workers"])]
        digests = client.gather(futures)
    events = [line.split() for line in log.read_text().splitlines()]
    trained = [float(t) for e, t in events if e == "trained"]
    asked = [float(t) for e, t in events if e == "asked"]
    assert len(trained) == 1 and len(asked) == 2
    assert max(asked) < trained[0], "both workers asked before the model existed, so one had to wait"
    assert digests[0] == digests[1]


def test_configs_and_points_pickle():
    """Grid points travel to Dask workers by pickle; a Config does too (e.g. in a user's own task)."""
    import pickle

    from vfnb.config import resolve
    cfg = resolve("preserve_first_merging", "smoke", seeds=[2, 3])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.seeds == [2, 3] and again.experiment == "preserve_first_merging"
    points = sweep.expand({"seeds": [[0, 1], [2, 3]]}, {"profile": "smoke"})
    assert pickle.loads(pickle.dumps(points)) == points

