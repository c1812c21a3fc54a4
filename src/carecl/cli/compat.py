"""`carecl import-reference` and `carecl export-reference`: the CaRE release's checkpoints in and out."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from carecl.cli.common import add_data_arguments, data_overrides


def add_command(subparsers: Any) -> None:
    importer = subparsers.add_parser(
        "import-reference", help="turn a checkpoint saved by the CaRE release into a carecl run directory",
        description="Read a state dict saved by the CaRE release (torch.save(network.state_dict()), read with "
                    "weights_only=True), check every key against the model the config describes, and write a "
                    "run directory that `carecl eval` and carecl.runs.state.load_learner can use.")
    importer.add_argument("--checkpoint", type=Path, required=True, metavar="FILE", help="the release's .pth file")
    importer.add_argument("--config", type=Path, required=True, metavar="RELEASE_JSON",
                          help="the release JSON the model was trained with (or a carecl YAML)")
    importer.add_argument("--output", type=Path, required=True, metavar="RUN_DIR", help="run directory to create")
    importer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set data.root=/data (repeatable)")
    importer.add_argument("--n-classes", type=int, metavar="N",
                          help="the dataset's class count, if the checkpoint has no backbone.head.weight")
    importer.set_defaults(handler=command_import_reference)

    exporter = subparsers.add_parser(
        "export-reference", help="write a carecl CaRE run in the release's checkpoint layout",
        description="Save a CaRE run's learner as the release saves its network (q/k/v split, release key "
                    "names), loadable by the release and by `carecl import-reference`.")
    exporter.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="a carecl CaRE run directory")
    exporter.add_argument("--output", type=Path, required=True, metavar="FILE", help="the .pth file to write")
    add_data_arguments(exporter)
    exporter.set_defaults(handler=command_export_reference)


def command_import_reference(args: argparse.Namespace) -> int:
    from carecl.compat.reference import import_reference

    summary = import_reference(args.checkpoint, args.config, args.output, overrides=args.overrides,
                               n_classes=args.n_classes)
    print(f"imported {len(summary.task_sizes)} tasks (classes per task {summary.task_sizes}, "
          f"{sum(summary.task_sizes)} of {summary.n_classes} classes seen); "
          f"ignored {len(summary.ignored_keys)} keys (anchor copies, unused timm head)")
    for note in summary.notes:
        print(f"note: {note}")
    print(f"run directory: {summary.run}")
    return 0


def command_export_reference(args: argparse.Namespace) -> int:
    from carecl.compat.reference import export_reference

    state = export_reference(args.run, args.output, data_overrides(args))
    print(f"wrote {len(state)} tensors in the release's layout: {args.output}")
    return 0
