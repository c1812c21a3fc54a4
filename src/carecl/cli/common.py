"""Arguments shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--output", type=Path, help="run directory to create (default: runs/<name>-<time>)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-root / --set data.KEY=VALUE for commands that reload a finished run (its dataset may have moved)."""
    parser.add_argument("--data-root", type=Path, metavar="DIR", help="where the run's dataset is now (data.root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="change a data.* setting of the run's config for this command (repeatable)")


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"data.root={args.data_root}"] if args.data_root is not None else [])]
