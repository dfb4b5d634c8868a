"""Command line: ``python -m vfnb book|run|list|train``."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml


def parse_value(text: str) -> Any:
    """Type a ``-p`` value like papermill: None, bools, ints, floats, YAML lists/dicts, else str."""
    low = text.strip().lower()
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (list, dict)) else text


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
    _add_params(book)

    run = sub.add_parser("run", help="execute one chapter with papermill")
    run.add_argument("chapter", help="chapter path, file stem or unique prefix (e.g. 04)")
    run.add_argument("--profile", help="size profile: smoke, cpu or paper")
    run.add_argument("-o", "--output", help="executed notebook (default _build/executed/<chapter path>)")
    run.add_argument("--no-progress", action="store_true", help="hide the cell progress bar")
    _add_params(run)

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
                            parameters=_params(args.parameter))
        elif args.command == "run":
            out = book.run_chapter(args.chapter, _params(args.parameter), output_path=args.output,
                                   profile=args.profile, progress=not args.no_progress)
            print(f"executed notebook: {out}")
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
