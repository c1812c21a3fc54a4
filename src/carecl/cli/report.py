"""`carecl report RUN_DIR [RUN_DIR ...] --output DIR`: plots, report.md and summary.csv."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help="plots, report.md and summary.csv comparing one or more run directories",
        description="Compare finished (or still running) carecl runs: accuracy curves, accuracy "
                    "matrices, forgetting per task, and a summary table (report.md, summary.csv).")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories written by carecl train/demo, or seed-group directories (mean ± std)")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="folder for the report (created if needed; default: RUN_DIR/report of the first run given)")
    parser.set_defaults(handler=command_report)


def command_report(args: argparse.Namespace) -> int:
    from carecl.report.build import build_report

    report = build_report(args.runs, args.output or args.runs[0] / "report")
    print(f"report: {report}")
    return 0
