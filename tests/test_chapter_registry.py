"""Chapter id = notebook stem without its number = ``vfnb.chapters`` module = ``EXPERIMENTS`` key, and every
notebook declares exactly the parameters ``EXPERIMENTS[id]`` declares."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from vfnb import book, resolve
from vfnb.config import EXPERIMENTS, parameter_names

CHAPTERS = book.chapters(ROOT)


def test_chapter_ids_are_the_experiments_in_reading_order():
    assert [book.chapter_id(p) for p in CHAPTERS] == list(EXPERIMENTS)
    assert book.chapter_id("05_4_preserve_first_merging") == "preserve_first_merging"
    assert book.chapter_id(ROOT / "book" / "01_introduction.ipynb") == "introduction"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_has_its_module_and_experiment(chapter: Path):
    cid = book.chapter_id(chapter)
    assert cid in EXPERIMENTS, f"{chapter.name}: add EXPERIMENTS[{cid!r}] to vfnb/config.py"
    module = importlib.import_module(f"vfnb.chapters.{cid}")
    assert module.__doc__ and module.__doc__.startswith("Paper §"), f"vfnb.chapters.{cid} needs a docstring"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_parameters_cell_declares_exactly_the_experiment(chapter: Path):
    cid = book.chapter_id(chapter)
    declared = book.notebook_parameters(chapter)
    assert list(declared) == parameter_names(cid), f"{chapter.name}: parameters cell must be {parameter_names(cid)}"
    assert declared["profile"] == "cpu"
    assert all(v is None for k, v in declared.items() if k != "profile"), declared


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_builds_its_config_with_one_short_call(chapter: Path):
    cid = book.chapter_id(chapter)
    code = [c.source for c in nbformat.read(chapter, as_version=4).cells if c.cell_type == "code"]
    assert f'cfg = vfnb.chapter_config("{cid}", globals())' in code[1]
    assert f"from vfnb.chapters import {cid}" in code[1]
    text = "\n".join(code)
    assert "vfnb.resolve(" not in text and "vfnb.experiments" not in text


def test_experiment_table_names_every_chapters_models():
    """Item 13: the model column of vanishing_feature / merging_vf read ", width ×0.25"."""
    from vfnb.chapters import experimental_setup
    rows = experimental_setup.experiment_table()
    assert {r["chapter"] for r in rows} == set(EXPERIMENTS)
    for r in rows:
        assert re.match(r"[A-Za-z]", r["model"]) and ", ," not in r["model"], r
    models = {(r["chapter"], r["profile"]): r["model"] for r in rows}
    assert models[("vanishing_feature", "cpu")] == "VGG16, VGG16-BN, width ×0.25; ResNet20, ResNet20-LN, width ×1.0"
    assert models[("merging_through_vf", "paper")].startswith("VGG16, VGG16-BN, VGG16-LN, width ×1.0; ResNet20,")
    assert "linear mlp (plain and residual), depth 5, width 32" in models[("merging_through_vf", "cpu")]
    assert models[("pruning", "cpu")] == "vgg16 (norm LN, BN), width ×0.25; ConvNeXt, width ×0.5 (6 epochs)"
    assert models[("introduction", "cpu")] == "as linear_networks: linear mlp, depth 8, width 32"


#: Zoo keys of the cpu edge models: a key that changes makes every reader retrain, so it must not depend on the
#: chapter id. The CNN keys changed once on purpose, with the cpu recipe (lr 0.1, weight decay 1e-2; appendix A.4);
#: the MLP and ResNet20-LN keys are the ones recorded before the chapters were renamed.
CPU_KEYS = {
    "linear MLP (§4)": ["6d09a96d9ece51c45655", "4cf1b2dcbfa04b8f07dd"],
    "VGG16": ["1f71b59e74b21db2aedd", "25b7f8127fd8653816cf"],
    "VGG16-BN": ["edf6bdbc98ae07b015bd", "7a510bcf0d2bbbd7b059"],
    "VGG16-LN": ["e0ebffc7bf2102963ba3", "a503d6f3c81046e71e79"],
    "ResNet20-BN": ["3bd75e351ccfe3badea8", "2537712fe5a0af421249"],
    "ResNet20-LN": ["2b078fc6f51ca6f860fc", "42aa76f73aa95bda8c7b"],
}
CPU_EXTRA_KEYS = {"weight decay 1e-4 (§5.3)": ["caf8b1354f2f43680017", "8d40efc4921bb85a387d"],
                  "Fig. 3D plain": ["038ec3e35c590f8dbfe2", "e340fa9c781827b85b70"],
                  "Fig. 3D residual": ["7df2e6a21e8c7308907d", "ecb21e989ab42a7d676d"]}


def test_zoo_keys_do_not_depend_on_the_chapter():
    from vfnb.chapters import common, experimental_setup, merging_through_vf, preserve_first_merging
    setup = experimental_setup.edge_configs(resolve("experimental_setup", "cpu"))
    assert {k: [c.key for c in v] for k, v in setup.items()} == CPU_KEYS
    known = {k for keys in CPU_KEYS.values() for k in keys}
    norm = resolve("enhanced_normalization", "cpu")
    assert [c.key for c in common.edge_configs(norm.replace(weight_decay=1e-4))] == CPU_EXTRA_KEYS["weight decay 1e-4 (§5.3)"]
    vf = resolve("merging_through_vf", "cpu")
    assert [c.key for c in merging_through_vf.mlp_configs(vf, False)] == CPU_EXTRA_KEYS["Fig. 3D plain"]
    assert [c.key for c in merging_through_vf.mlp_configs(vf, True)] == CPU_EXTRA_KEYS["Fig. 3D residual"]
    used = [c.key for c in common.edge_configs(norm)]
    pfm = resolve("preserve_first_merging", "cpu")
    used += [c.key for c in common.edge_configs(pfm) + common.edge_configs(preserve_first_merging.resnet_config(pfm))]
    prune = resolve("pruning", "cpu")
    used += [common.edge_configs(prune, norm=n, seeds=[prune.seed])[0].key for n in ("ln", "bn")]
    for chapter in ("vanishing_feature", "merging_through_vf"):
        cfg = resolve(chapter, "cpu")
        used += [c.key for label, (m, n) in common.ARCHS.items()
                 for c in common.edge_configs(common.arch_cfg(cfg, m), model=m, norm=n)]
    assert set(used) <= known, "a chapter trains a cpu edge model the other chapters do not share"
