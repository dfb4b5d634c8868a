"""Wall time of every chapter at profile ``smoke``, against the 30 s goal per chapter.

Run: ``python benchmarks/bench_smoke_chapters.py [chapter ...]`` (default: every chapter).
The first run also trains the smoke edge models; later runs find them in the zoo.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from vfnb import book

GOAL_S = 30.0


def main(selected: list[str]) -> int:
    chapters = [book.resolve_chapter(c) for c in selected] if selected else book.chapters()
    print(f"{'chapter':<32} {'seconds':>8} {'/ goal':>7}")
    slow = 0
    with tempfile.TemporaryDirectory() as tmp:
        for chapter in chapters:
            start = time.perf_counter()
            book.run_chapter(chapter, output_path=Path(tmp) / chapter.name, profile="smoke", progress=False)
            seconds = time.perf_counter() - start
            slow += seconds > GOAL_S
            print(f"{chapter.stem:<32} {seconds:8.1f} {seconds / GOAL_S:7.2f}", flush=True)
    print(f"{slow} of {len(chapters)} chapters over the {GOAL_S:.0f} s goal")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
