"""Section 4 chapter at the `cpu` profile: cold (empty zoo) and warm (zoo cached).

Goals on a 2-core machine: under 180 s cold, under 30 s warm. Prints each time and its ratio to
the goal (below 1.0 meets it). Run: `.venv/bin/python benchmarks/bench_chapter4.py`.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vfnb.book import run_chapter

GOALS = {"cold": 180.0, "warm": 30.0}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("cold", "warm"):
            t = time.perf_counter()
            run_chapter("04_linear_networks", {"profile": "cpu", "cache_dir": str(Path(tmp) / "zoo")},
                        output_path=Path(tmp) / f"{phase}.ipynb", progress=False)
            dt = time.perf_counter() - t
            print(f"chapter 04 cpu {phase:>4}: {dt:6.1f} s  goal {GOALS[phase]:5.0f} s  ratio {dt / GOALS[phase]:.2f}")


if __name__ == "__main__":
    main()
