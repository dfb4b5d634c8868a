"""The "claims" table every chapter ends with: each claim of the paper, whether it holds in this run, and
the measured evidence.

A comparison of two test accuracies holds only beyond the sampling noise of the test set: two standard
errors of the difference of two binomial proportions measured on ``n`` images each (:func:`noise_margin`).
Smaller differences are a tie, shown as "within noise"::

    c = Claims(n=len(test))
    c.add("REPAIR beats no normalization", c.greater(acc_repair, acc_plain), f"{acc_repair:.3f} vs {acc_plain:.3f}")
    plots.table(c.rows)
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from IPython.display import Markdown

    from ..config import Config

import numpy as np

#: A claim's verdict: it holds, it does not, or the comparison is within noise.
Verdict = Union[bool, Literal["tie"]]
TIE: Literal["tie"] = "tie"
#: How each verdict reads in the table's "holds here" column.
LABELS = {True: "yes", False: "no", TIE: "within noise"}
#: Standard errors in the margin (two: about a 95 % two-sided interval).
Z = 2.0


def noise_margin(a: float, b: float, n: int, z: float = Z) -> float:
    """``z`` standard errors of the difference of two accuracies ``a`` and ``b`` measured on ``n`` test images
    each (binomial, independent): ``z · sqrt((a(1−a) + b(1−b)) / n)``."""
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"noise_margin compares accuracies: {name} must be a number in [0, 1], got {v!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"noise_margin needs the number of test images n as an integer >= 1, got {n!r}")
    return z * math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def compare(a: float, b: float, n: int, z: float = Z) -> Verdict:
    """``True`` if accuracy ``a`` beats ``b`` beyond :func:`noise_margin`, ``False`` if ``b`` beats ``a`` beyond
    it, else ``"tie"``."""
    m = noise_margin(a, b, n, z)
    return True if a - b > m else False if b - a > m else TIE


def all_of(*verdicts: Verdict) -> Verdict:
    """Several verdicts as one: ``False`` if any is ``False``, else ``"tie"`` if any is a tie, else ``True``."""
    checked = [_check(v) for v in verdicts]
    return False if False in checked else TIE if TIE in checked else True


def negate(verdict: Verdict) -> Verdict:
    """The opposite verdict (a tie stays a tie)."""
    v = _check(verdict)
    return TIE if v == TIE else not v


def _check(holds: Any) -> Verdict:
    if isinstance(holds, str) and holds == TIE:
        return TIE
    if isinstance(holds, (bool, np.bool_)):
        return bool(holds)
    raise TypeError(f"a claim holds True, False or 'tie', got {holds!r} ({type(holds).__name__})")


class Claims:
    """Builder of one chapter's claims table; ``n`` is the number of test images behind its accuracies."""

    def __init__(self, n: int | None = None) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"Claims(n=...) is the number of test images, an integer >= 1; got {n!r}")
        self.n = n
        self.rows: list[dict[str, str]] = []

    def _n(self, n: int | None) -> int:
        n = self.n if n is None else n
        if n is None:
            raise ValueError("comparing accuracies needs the number of test images: pass n=..., or Claims(n=...)")
        return n

    def add(self, claim: str, holds: Verdict, evidence: str, paper: str | None = None) -> Verdict:
        """Append a row; ``holds`` is ``True``, ``False`` or ``"tie"``; ``paper`` is the paper's own figure for the
        claim, where it gives one (shown beside this run's evidence). Returns the verdict."""
        v = _check(holds)
        row = {"claim": claim, "holds here": LABELS[v], "evidence": evidence}
        if paper:
            row["paper"] = paper
        self.rows.append(row)
        return v

    def margin(self, a: float, b: float, n: int | None = None) -> float:
        """:func:`noise_margin` of two accuracies on ``n`` (default: this table's) test images."""
        return noise_margin(a, b, self._n(n))

    def greater(self, a: float, b: float, n: int | None = None) -> Verdict:
        """Accuracy ``a`` > ``b`` beyond the noise margin (``"tie"`` within it)."""
        return compare(a, b, self._n(n))

    def less(self, a: float, b: float, n: int | None = None) -> Verdict:
        """Accuracy ``a`` < ``b`` beyond the noise margin (``"tie"`` within it)."""
        return compare(b, a, self._n(n))

    def at_least(self, a: float, b: float, n: int | None = None) -> bool:
        """Accuracy ``a`` is not below ``b`` beyond the noise margin (ties count as holding)."""
        return compare(b, a, self._n(n)) is not True

    def table(self) -> list[dict[str, str]]:
        """The rows: claim, "holds here" (yes / no / within noise), evidence."""
        return list(self.rows)


def show(cfg: "Config", rows: list[dict[str, str]], results_dir: "str | os.PathLike | None" = None) -> "Markdown":
    """Display a chapter's claims table and record it (:func:`vfnb.results.record`, result ``"claims"``), so
    that the conclusion page (paper §6) can gather every chapter's claims. Returns the displayed table."""
    from ..plots import table
    from ..results import record
    for r in rows:
        if set(r) - {"claim", "holds here", "evidence", "paper"} or not {"claim", "holds here", "evidence"} <= set(r):
            raise ValueError(f"a claims row has the keys claim, holds here, evidence (and optionally paper); got {sorted(r)}")
    record(cfg, "claims", rows, results_dir)
    return table(rows)
