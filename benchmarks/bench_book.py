"""The budgets of ``make book`` at ``cpu``: at most 45 min cold (a fresh zoo: every edge model is trained) and 5 min
warm (the zoo and the cache of executed chapters from the cold build), with every chapter in ``_toc.yml``.
Prints each chapter's wall time in both builds (from ``<out>/timings.json``) and the totals against the goals.

Run: ``python benchmarks/bench_book.py [--zoo existing] [--profile cpu] [--out DIR]``. ``--zoo existing`` uses
``$VFNB_CACHE`` (default ``~/.cache/vfnb/zoo``) instead of a fresh one, and then its first build is "cold" only for
what that zoo lacks. The cache of executed chapters is always a fresh one (``VFNB_EXECUTED``). A third build with ``--no-cache`` (the zoo warm, every chapter executed again) shows what the
cache of executed chapters saves. Cold takes tens of minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

GOALS_MIN = {"cold": 45.0, "warm": 5.0}


def build(label: str, out: Path, profile: str, use_cache: bool) -> tuple[float, dict[str, float]]:
    from vfnb import book

    start = time.perf_counter()
    book.build_book(profile=profile, out_dir=out, progress=False, use_cache=use_cache)
    total = time.perf_counter() - start
    timings = json.loads((out / "timings.json").read_text())["chapters"]
    print(f"{label}: {total / 60:.1f} min", flush=True)
    return total, {t["chapter"]: t["seconds"] for t in timings}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", choices=("fresh", "existing"), default="fresh")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", help="build folder (default: a temporary one)")
    parser.add_argument("--skip-nocache", action="store_true", help="skip the third build (--no-cache)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.zoo == "fresh":
            os.environ["VFNB_CACHE"] = str(Path(tmp) / "zoo")
        os.environ["VFNB_EXECUTED"] = str(Path(tmp) / "executed")  # no executed chapter from before counts as cold
        out = Path(args.out or Path(tmp) / "book")  # one folder: the builds share its npm scripts (js_cache)
        first = "cold" if args.zoo == "fresh" else "zoo warm, nothing cached"  # only a fresh zoo is a cold build
        runs = {first: build(first, out, args.profile, True), "warm": build("warm", out, args.profile, True)}
        if not args.skip_nocache:
            runs["warm, --no-cache"] = build("warm, --no-cache", out, args.profile, False)
    chapters = list(runs[first][1])
    print(f"\n{'chapter':<32}" + "".join(f"{k:>28}" for k in runs))
    for c in chapters:
        print(f"{c:<32}" + "".join(f"{runs[k][1].get(c, float('nan')) / 60:>24.2f} min" for k in runs))
    print(f"{'total':<32}" + "".join(f"{runs[k][0] / 60:>24.2f} min" for k in runs))
    for k, goal in GOALS_MIN.items():
        if k not in runs:
            print(f"{k}: not measured (--zoo existing; the cold figure needs a fresh zoo)")
            continue
        total = runs[k][0] / 60
        print(f"{k}: {total:.1f} min, goal <= {goal:.0f} min: {'met' if total <= goal else 'NOT met'} "
              f"(zoo: {args.zoo}, {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
