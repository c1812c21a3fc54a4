"""`carecl learn --run DIR NEW_DATA`: a finished run learns new classes from an image folder (docs/learning-later.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "learn", help="a finished run learns the classes of a new image folder, on top of everything it learned",
        description="The classes of NEW_DATA (DIR/train/<class>/ with an optional DIR/test/<class>/, or DIR/<class>/ "
                    "with --test-fraction) become the run's next task (or tasks of --increment classes), learned as "
                    "the stream's next tasks would be; the run is then evaluated on every test image it knows. "
                    "Killed midway, `carecl train --resume DIR` (or the same command) finishes the step.")
    parser.add_argument("--run", type=Path, required=True, metavar="DIR", help="a finished run directory")
    parser.add_argument("new_data", type=Path, metavar="NEW_DATA", help="the image folder of the new classes")
    parser.add_argument("--increment", type=int, metavar="K", help="learn the new classes K per task (default: one task)")
    parser.add_argument("--test-fraction", type=float, metavar="F",
                        help="NEW_DATA is DIR/<class>/: hold out this fraction of each class for testing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change how the new tasks train (train.*, eval.*, logging.*), e.g. --set train.epochs=5")
    parser.add_argument("--data-root", type=Path, metavar="DIR", help="where the run's own dataset is now (data.root)")
    parser.set_defaults(handler=command_learn)


def command_learn(args: argparse.Namespace) -> int:
    from carecl.config import ConfigError
    from carecl.engine.learn import learn
    from carecl.report.text import accuracy_table

    if args.increment is not None and args.increment <= 0:
        raise ConfigError(f"--increment must be positive, got {args.increment}")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    overrides = [*args.overrides, *([f"data.root={args.data_root}"] if args.data_root is not None else [])]
    summary = learn(args.run, args.new_data, args.increment, args.test_fraction, overrides)
    print(accuracy_table(summary))
    print(f"run directory: {args.run}")
    return 0
