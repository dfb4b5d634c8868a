"""The reproduction page's module on a sweep folder written by vfnb.sweep's own writers (no notebook runs)."""
from __future__ import annotations

import json

import pytest

from vfnb import results, sweep
from vfnb.chapters import reproduction as R
from vfnb.config import Config, resolve


def _fake_sweep(folder, pairs=((0, 1), (2, 3), (4, 5))):
    """Three points of 5.4 whose Table 1 cells are known: 'AM RESCALE' at PFM 8/14 is 0.9 + 0.01 * pair index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({"runs": [{"commit": "abc1234567890", "device": "cpu (2 cores)",
                                                             "date": "2026-12-03T10:00:00+00:00", "points run": 3,
                                                             "command": "vfnb sweep 05_4 ..."}]}))
    points = []
    for i, seeds in enumerate(pairs):
        params = {"profile": "cpu", "seeds": list(seeds)}
        points.append(params)
        point = folder / "points" / sweep.point_id(params)
        cfg = Config("preserve_first_merging", {**params, "dataset": "mnist5k", "model": "vgg16", "model_width": 0.25,
                                                "n_test": 500})
        rows = [{"Model": "Model 1", "Direct": 0.95}, {"Model": "Model 2", "Direct": 0.93},
                {"Model": "Ensemble", "Direct": 0.97},
                {"Model": "PFM 0/14", "Direct": 0.1, "AM no normalization": 0.5, "AM REPAIR": 0.6, "AM RESCALE": 0.7},
                {"Model": "PFM 8/14", "Direct": 0.3, "AM no normalization": 0.92, "AM REPAIR": 0.93,
                 "AM RESCALE": 0.9 + 0.01 * i}]
        results.record_table(cfg, "table1", rows, index="Model", results_dir=point / "results")
        (point / "chapter.ipynb").write_text("{}")
        (point / "point.json").write_text(json.dumps({"parameters": params, "status": "done", "seconds": 1.0}))
    rows, layouts = sweep.gather(folder, points, "preserve_first_merging")
    names = ["profile", "seeds"]
    sweep.write_outputs(folder, rows, results.summarize(rows, names), names, layouts)


def test_reproduction_tables_come_from_the_committed_files(tmp_path):
    _fake_sweep(tmp_path / "cpu" / "05_4_preserve_first_merging")
    cfg = resolve("reproduction", "cpu", sweeps_dir=str(tmp_path))
    found = R.sweeps(cfg)
    assert found["05_3_enhanced_normalization"] is None
    sw = found["05_4_preserve_first_merging"]
    assert sw.done == 3
    table = {r["Model"]: r for r in R.comparison_table(sw, "table1")}
    assert table["PFM 8/14"]["AM RESCALE"] == "91.00 ± 0.82"  # mean and numpy std of 90, 91, 92
    assert table["PFM 8/14"]["AM RESCALE, paper"] == "92.43 ± 0.23"
    assert table["Model 1"]["Direct, paper"] == "91.88 ± 0.02" and table["PFM 8/14"]["n"] == "3"
    prov = {r["chapter"]: r for r in R.provenance_table(found, "cpu")}
    assert prov["05_4_preserve_first_merging"]["commit"] == "abc1234567" and "3/3" in prov["05_4_preserve_first_merging"]["points"]
    assert prov["05_3_enhanced_normalization"]["points"] == "not run"
    assert R.command("05_3_enhanced_normalization", "cpu") in prov["05_3_enhanced_normalization"]["command"]
    text = R.status(found, "cpu", {s: None for s in R.SWEEPS})
    assert "paper scale has not been run" in text and "--profile paper" in text
    notes = R.notes(found)
    assert "94.00 % here" in notes  # no merge beats the edges' 94 % (the best, AM REPAIR at 8/14, is 93 %)
    assert "here: none; in the paper: PFM 8/14 (AM RESCALE 92.43 %), PFM 12/14 (Direct 92.88 %)" in notes
    assert "mnist5k, VGG16 ×0.25, 500 test images" in notes and "500 test images has a standard error" in notes
    assert "can come from test-set sampling alone" in notes  # a spread of 0.82 points against a 1.1-point error
    assert prov["05_4_preserve_first_merging"]["device"] == "cpu (2 cores)"
    assert prov["05_4_preserve_first_merging"]["dates"] == "2026-12-03"
    import matplotlib
    matplotlib.use("Agg")
    from vfnb import plots
    fig, ax = plots.figure(1, width=6.5, height=3.8)
    R.plot_pfm(ax[0], sw, "table1", ["AM no normalization", "AM RESCALE"])
    assert len(ax[0].containers) == 4  # here and paper, per column, each with error bars
    labels = [c.get_label() for c in ax[0].containers]
    assert "AM RESCALE, here (mnist5k)" in labels and "AM RESCALE, paper (CIFAR-10)" in labels
    sw.summary.append({**sw.summary[0], "group": "profile='cpu', alpha=0.25"})  # a sweep over more than seeds
    with pytest.raises(ValueError, match="varies more than the seeds"):
        sw.cells("table1")


def test_paper_tables_match_the_chapter_layout():
    """The transcribed paper rows use the chapter's row labels (its l grid at cpu and paper) and column names."""
    from vfnb.chapters import preserve_first_merging as pfm
    from vfnb.normalize import Fix
    for profile in ("cpu", "paper"):
        cfg = resolve("preserve_first_merging", profile)
        assert {f"PFM {l}/14" for l in cfg.pfm_layers} <= set(R.PAPER_TABLE1)
        assert {f"PFM {l}/20" for l in cfg.resnet_layers} <= set(R.PAPER_TABLE7)
    columns = {"Direct", *(f"AM {c.label}" for c in pfm.COLUMNS[False])}
    assert {c for row in R.PAPER_TABLE1.values() for c in row} == columns
    assert {c for row in R.PAPER_TABLE7.values() for c in row} == {"Direct", f"AM {Fix.NONE.label}", f"AM {Fix.RESET.label}"}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_reproduction_page_reads_nothing_when_nothing_is_committed(tmp_path, profile):
    cfg = resolve("reproduction", profile, sweeps_dir=str(tmp_path))
    found = R.sweeps(cfg)
    assert all(v is None for v in found.values())
    assert "Not committed" in R.status(found, profile, found) and R.notes(found).startswith("*No sweep")
