"""`carecl compare RUN_OR_GROUP ... [--output DIR]`: our numbers next to the published ones."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare", help="runs or seed groups next to the published numbers of the same method and dataset",
        description="For each run (or seed group: mean ± std), the published Ā / A_last of the same method on the "
                    "same dataset (carecl/published/), the differences, and every way the run's protocol (split, "
                    "backbone weights, seed) differs from the published row's.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_OR_GROUP")
    parser.add_argument("--output", type=Path, metavar="DIR", help="also write compare.md and compare.csv there")
    parser.set_defaults(handler=command_compare)


def command_compare(args: argparse.Namespace) -> int:
    from carecl.report.compare import compare, comparison_csv, comparison_markdown

    comparisons = compare(args.runs)
    table = comparison_markdown(comparisons)
    print(table)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "compare.md").write_text(table + "\n", encoding="utf-8")
        (args.output / "compare.csv").write_text(comparison_csv(comparisons), encoding="utf-8")
    return 0
