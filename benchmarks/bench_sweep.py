"""Sweep speed-up: 4 ``smoke`` points of one chapter on a 2-worker Dask ``LocalCluster`` (``vfnb sweep``), against the
same 4 points run one after another with ``vfnb.book.run_chapter`` (each with all of torch's threads). Goal ≥ 1.5×.

Run: ``python benchmarks/bench_sweep.py [CHAPTER]`` (default ``04``: α × seed pairs). A first sweep into a scratch
folder trains the edge models, so both timings find them in the zoo; the zoo is a temporary folder unless
``VFNB_CACHE`` is set.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.5
GRID = {"alpha": [0.25, 0.5], "seeds": [[0, 1], [2, 3]]}


def main(argv: list[str]) -> int:
    chapter = argv[0] if argv else "04"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VFNB_CACHE", str(Path(tmp) / "zoo"))
        os.environ["VFNB_RESULTS"] = str(Path(tmp) / "results")
        from vfnb import book, sweep

        points = sweep.expand(GRID, {"profile": "smoke"})
        print(f"{len(points)} smoke points of {chapter}: {'; '.join(sweep.describe(p) for p in points)}", flush=True)
        sweep.sweep(chapter, GRID, profile="smoke", out=Path(tmp) / "warmup", workers=2, progress=False)  # trains
        start = time.perf_counter()
        for i, params in enumerate(points):
            book.run_chapter(chapter, params, output_path=Path(tmp) / "serial" / f"{i}.ipynb", progress=False)
        serial = time.perf_counter() - start
        start = time.perf_counter()
        res = sweep.sweep(chapter, GRID, profile="smoke", out=Path(tmp) / "sweep", workers=2, progress=False)
        parallel = time.perf_counter() - start
    failed = len(res.failures)
    ratio = serial / parallel
    print(f"one after another: {serial:6.1f} s")
    print(f"vfnb sweep, 2 workers: {parallel:6.1f} s (cluster start-up included; {failed} failed)")
    verdict = "not measured: points failed" if failed else ("met" if ratio >= GOAL else "NOT met")
    print(f"speed-up: {ratio:.2f}x (goal >= {GOAL}x: {verdict}) on {os.cpu_count()} cores")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
