"""vfnb.chapters.claims: the claims table and its binomial noise margin."""
from __future__ import annotations

import ast
import importlib
import inspect
import math

import numpy as np
import pytest

from vfnb.chapters import claims as C
from vfnb.chapters.claims import TIE, Claims, all_of, compare, negate, noise_margin


def test_noise_margin_is_two_standard_errors_of_the_difference():
    assert noise_margin(0.9, 0.9, 1000) == pytest.approx(2 * math.sqrt(2 * 0.9 * 0.1 / 1000))  # 0.0268
    assert noise_margin(0.5, 0.5, 1000) == pytest.approx(2 * math.sqrt(0.5 / 1000))            # 0.0447
    assert noise_margin(0.8, 0.6, 500) == pytest.approx(2 * math.sqrt((0.16 + 0.24) / 500))
    assert noise_margin(0.5, 0.5, 4000) == pytest.approx(noise_margin(0.5, 0.5, 1000) / 2)   # 1/sqrt(n)
    assert noise_margin(1.0, 0.0, 10) == 0.0 and noise_margin(0.9, 0.9, 1000, z=1.0) == pytest.approx(0.0134, abs=1e-4)
    assert noise_margin(0.3, 0.7, 200) == noise_margin(0.7, 0.3, 200)  # symmetric


@pytest.mark.parametrize("a,b,n", [(1.2, 0.5, 10), (0.5, -0.1, 10), (0.5, 0.5, 0), (0.5, 0.5, 2.5), (True, 0.5, 10)])
def test_noise_margin_rejects_what_is_not_accuracies_on_n_images(a, b, n):
    with pytest.raises(ValueError, match="noise_margin"):
        noise_margin(a, b, n)


def test_compare_and_the_builder_apply_the_margin():
    m = noise_margin(0.90, 0.88, 1000)  # 0.0276: a 2-point gap is within noise on 1,000 images
    assert m > 0.02 and compare(0.90, 0.88, 1000) == TIE and compare(0.88, 0.90, 1000) == TIE
    assert compare(0.90, 0.88, 10_000) is True and compare(0.88, 0.90, 10_000) is False
    assert compare(0.5, 0.5, 10**9) == TIE  # equal values never "win"
    c = Claims(n=1000)
    assert c.greater(0.95, 0.85) is True and c.less(0.95, 0.85) is False and c.greater(0.851, 0.85) == TIE
    assert c.at_least(0.84, 0.85) and not c.at_least(0.75, 0.85) and c.margin(0.9, 0.88) == pytest.approx(m)
    assert c.greater(0.90, 0.88, n=10_000) is True  # n per comparison overrides the table's
    with pytest.raises(ValueError, match="number of test images"):
        Claims().greater(0.9, 0.8)
    with pytest.raises(ValueError, match="integer >= 1"):
        Claims(n=0)


def test_verdicts_combine_and_read_as_yes_no_within_noise():
    assert all_of(True, True) is True and all_of(True, TIE) == TIE and all_of(TIE, False) is False
    assert all_of() is True and negate(True) is False and negate(TIE) == TIE
    c = Claims(n=100)
    assert c.add("a", True, "e") is True and c.add("b", np.bool_(False), "e") is False and c.add("c", TIE, "e") == TIE
    assert [r["holds here"] for r in c.table()] == ["yes", "no", "within noise"]
    assert c.table()[0] == {"claim": "a", "holds here": "yes", "evidence": "e"}
    for bad in ("yes", 1, None, 0.5):
        with pytest.raises(TypeError, match="True, False or 'tie'"):
            c.add("d", bad, "e")


CHAPTERS_WITH_CLAIMS = ("preliminaries", "linear_networks", "vanishing_feature", "merging_through_vf",
                        "enhanced_normalization", "preserve_first_merging", "pruning")


@pytest.mark.parametrize("chapter", CHAPTERS_WITH_CLAIMS)
def test_every_claims_table_is_built_with_the_shared_helper(chapter):
    """No chapter keeps its own ``add``/``_row`` or margin: ``claims(res)`` builds a :class:`Claims`."""
    module = importlib.import_module(f"vfnb.chapters.{chapter}")
    source = inspect.getsource(module.claims)
    assert "Claims(n=" in source and "return c" in source.replace("return cl", "return c")
    tree = ast.parse(inspect.getsource(module))
    local = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not local & {"add", "_row", "noise_margin", "verdict"}, local & {"add", "_row", "noise_margin", "verdict"}
    assert set(C.LABELS.values()) == {"yes", "no", "within noise"}
