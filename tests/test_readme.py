"""The README's library examples run as written (at the smoke profile instead of cpu, to stay fast)."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "vfnb." in b]


def test_the_readme_has_library_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    calls = "".join(blocks)
    for name in ("interpolate", "activation_matching", "apply_permutation", "repair", "rescale", "vf_curve",
                 "preserve_first", "count_cost", "prune", "repair_pruned", "Fix", "ot_matching", "task_arithmetic",
                 "ties_merging", "tall_merging", "align_many", "tact", "linear_probe", "activation_gap", "merge_many"):
        assert f"vfnb.{name}" in calls, name


@pytest.mark.slow
def test_the_readme_examples_run() -> None:
    namespace: dict = {}
    for block in python_blocks():
        code = block.replace('"cpu"', '"smoke"').replace("epochs=20", "epochs=1")
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["pfm"].layers == 8
    assert 0 <= namespace["curve"].bound[-1]
    assert namespace["vit_pfm"].layers == 3 and namespace["ot"].reg == 0.1
    assert namespace["fixed"].num_tasks == 3 and namespace["logits"].shape == (1, 10)
    assert namespace["tall"].masks is not None
