"""`carecl diagnose RUN_DIR [--output DIR]`: CaRE's routing per block (R@M, E@K, entropy gap, expert usage)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from carecl.cli.common import add_data_arguments, data_overrides


OUTPUT_DIR = "diagnostics"


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "diagnose", help="routing diagnostics of a CaRE run: R@M, E@K, entropy gap, expert usage per block",
        description="Run the task-free forward of a finished CaRE run on the test images of its seen classes "
                    "and measure, per block, how often each sample is routed to its own task's router (R@M) "
                    "and expert (E@K), the entropy gap of its task's class perceptron, and expert usage.")
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory written by carecl train/demo")
    parser.add_argument("--output", type=Path, metavar="DIR", help=f"folder for the files (default: RUN_DIR/{OUTPUT_DIR})")
    add_data_arguments(parser)
    parser.set_defaults(handler=command_diagnose)


def command_diagnose(args: argparse.Namespace) -> int:
    from carecl.engine.checkpointing import load_experiment
    from carecl.runs.directory import RunDirectory
    from carecl.report.routing import diagnose_routing
    from carecl.report.routing_files import write_diagnostics

    experiment = load_experiment(RunDirectory.open(args.run), data_overrides=data_overrides(args))
    diagnostics = diagnose_routing(experiment)
    files = write_diagnostics(diagnostics, args.output or args.run / OUTPUT_DIR)
    print(diagnostics.table())
    print(f"table: {files['markdown']}  ({files['csv'].name}, {files['usage'].name})")
    print(f"figure: {files['figure']}")
    return 0
