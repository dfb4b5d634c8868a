"""Command line: ``python -m vfnb book|run|sweep|list|train``."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from vfnb.book import parse_value  # noqa: F401  (re-exported: the -p typing rule)


def _params(pairs: Sequence[Sequence[str]] | None) -> dict[str, Any]:
    return {name: parse_value(value) for name, value in pairs or []}


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="chapter parameter (repeatable), typed like papermill's -p")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfnb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    book = sub.add_parser("book", help="execute every chapter and build the HTML book")
    book.add_argument("--profile", default="cpu", help="size profile: smoke, cpu or paper (default cpu)")
    book.add_argument("--out", default="_build", help="output folder (default _build)")
    book.add_argument("-c", "--chapter", action="append", help="build only these chapters (repeatable)")
    book.add_argument("--no-cache", action="store_true",
                      help="execute every chapter, even those whose notebook, parameters and library are unchanged")
    _add_params(book)

    run = sub.add_parser("run", help="execute one chapter with papermill")
    run.add_argument("chapter", help="chapter path, file stem or unique prefix (e.g. 04)")
    run.add_argument("--profile", help="size profile: smoke, cpu or paper")
    run.add_argument("-o", "--output", help="executed notebook (default _build/executed/<chapter path>)")
    run.add_argument("--no-progress", action="store_true", help="hide the cell progress bar")
    _add_params(run)

    sw = sub.add_parser("sweep", help="run a grid of parameter sets of one chapter on Dask and gather the results",
                        description="Run every point of a grid of one chapter's parameters (each a papermill run, as "
                                    "`vfnb run`) on a Dask LocalCluster or an existing scheduler; skip the points the "
                                    "output folder already holds; write results.csv/.parquet and a mean ± std summary "
                                    "over seeds. Example: vfnb sweep 05_4 --profile cpu -g seeds='[[0, 1], [2, 3], [4, 5]]'")
    sw.add_argument("chapter", nargs="?", help="chapter path, file stem or unique prefix (or 'chapter:' in --grid)")
    sw.add_argument("-g", "--axis", action="append", default=[], metavar="NAME=[V1, V2]",
                    help="a grid axis (repeatable); the grid is the product of the axes")
    sw.add_argument("--grid", metavar="FILE", help="YAML sweep file: grid, points, parameters, chapter, profile")
    sw.add_argument("--profile", help="size profile: smoke, cpu or paper")
    sw.add_argument("--out", help="output folder (default sweeps/<chapter>)")
    sw.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes, one thread each (default 2)")
    sw.add_argument("--scheduler", metavar="ADDRESS", help="submit to this Dask scheduler instead of a LocalCluster")
    sw.add_argument("--rerun-stale", action="store_true",
                    help="recompute finished points computed by another version of the chapter or of vfnb")
    sw.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_params(sw)

    listing = sub.add_parser("list", help="list the chapters and their parameters")
    listing.add_argument("chapter", nargs="?", help="only this chapter")

    train = sub.add_parser("train", help="train (or load from the zoo) one edge model")
    train.add_argument("--model", required=True, help="architecture name")
    train.add_argument("--dataset", help="dataset name (default: the profile's)")
    train.add_argument("--seed", type=int, default=0, help="training seed, an integer >= 0 (default 0)")
    train.add_argument("--profile", default="cpu", help="size profile (default cpu)")
    train.add_argument("--epochs", type=int, help="training epochs (default: the profile's)")
    train.add_argument("--data-root", help="folder of torchvision datasets (paper profile)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from papermill.exceptions import PapermillExecutionError

    from vfnb import book
    from vfnb.config import ConfigError
    from vfnb.data import DatasetNotFoundError
    from vfnb.zoo import CacheDirError

    try:
        if args.command == "book":
            book.build_book(profile=args.profile, out_dir=args.out, chapters=args.chapter,
                            parameters=_params(args.parameter), use_cache=not args.no_cache)
        elif args.command == "run":
            out = book.run_chapter(args.chapter, _params(args.parameter), output_path=args.output,
                                   profile=args.profile, progress=not args.no_progress)
            print(f"executed notebook: {out}")
        elif args.command == "sweep":
            from vfnb import sweep

            chapter, grid, params, points, profile = sweep.sweep_spec(args.chapter, args.grid, args.axis,
                                                                      _params(args.parameter), args.profile)
            import warnings

            shown = warnings.showwarning
            warnings.showwarning = lambda message, category, *rest, **kw: print(  # one line, no source line
                f"warning: {message}", file=sys.stderr) if category is sweep.StalePointsWarning else shown(
                message, category, *rest, **kw)
            try:
                result = sweep.sweep(chapter, grid, params, points, profile=profile, out=args.out,
                                     workers=args.workers, scheduler=args.scheduler, progress=not args.no_progress,
                                     argv=["vfnb", *(argv if argv is not None else sys.argv[1:])],
                                     rerun_stale=args.rerun_stale)
            except KeyboardInterrupt:
                return 130
            finally:
                warnings.showwarning = shown
            return 1 if result.failures else 0
        elif args.command == "list":
            paths = [book.resolve_chapter(args.chapter)] if args.chapter else book.chapters()
            for path in paths:
                defaults = ", ".join(f"{k}={v!r}" for k, v in book.notebook_parameters(path).items())
                print(f"{path.stem}: {defaults or '(no parameters)'}")
        elif args.command == "train":
            from vfnb.zoo import train_cli

            return int(train_cli(args) or 0)
    except book.BookError as err:
        parser.error(str(err))  # exits with status 2
    except (ConfigError, CacheDirError, DatasetNotFoundError) as err:  # a user error: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:  # a failing chapter: short message, exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
