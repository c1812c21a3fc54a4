"""`carecl data prepare | verify | download`: get a benchmark into the folder carecl reads, and check it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="prepare, verify or download a benchmark's files",
                                   description="Unpack a benchmark's archive where carecl reads it, check it against "
                                               "its published counts and a checksum manifest, or download it.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    # Names are checked by the command (the catalog lives in carecl.data, which loads torch: --help stays light).
    names = {"metavar": "NAME", "help": "a benchmark: omnibenchmark1k, imagenet-r, imagenet-a, objectnet, omnibenchmark, vtab, cub, cifar100, ..."}
    prepare = actions.add_parser("prepare", help="unpack an archive (tar, zip) or copy an unpacked folder; resumable")
    prepare.add_argument("name", **names)
    prepare.add_argument("--archive", type=Path, required=True, metavar="FILE|DIR")
    prepare.add_argument("--root", type=Path, required=True, metavar="DIR", help="data.root of the configs")
    prepare.set_defaults(handler=command_prepare)
    verify = actions.add_parser("verify", help="counts, unreadable images, duplicates across splits, checksums; "
                                               "or a folder of your own images (carecl data verify DIR)")
    verify.add_argument("name", metavar="NAME|DIR", help=f"{names['help']}; or the folder of your own ImageFolder tree")
    verify.add_argument("--root", type=Path, metavar="DIR", help="data.root of the configs (for a benchmark NAME)")
    verify.set_defaults(handler=command_verify)
    download = actions.add_parser("download", help="fetch from the Hugging Face hub (omnibenchmark1k), then prepare")
    download.add_argument("name", **names)
    download.add_argument("--root", type=Path, required=True, metavar="DIR")
    download.set_defaults(handler=command_download)


def command_prepare(args: argparse.Namespace) -> int:
    from carecl.data.prepare import prepare

    print(f"prepared: {prepare(args.name, args.archive, args.root)}")
    return 0


def command_verify(args: argparse.Namespace) -> int:
    from carecl.data.base import DatasetError
    from carecl.data.catalog import CATALOG
    from carecl.data.verify import verify, verify_own_tree

    if args.name not in CATALOG and Path(args.name).expanduser().is_dir():
        report = verify_own_tree(Path(args.name))
    elif args.root is None:
        raise DatasetError(f"carecl data verify {args.name} needs --root DIR (where the benchmark's folder is)")
    else:
        report = verify(args.name, args.root)
    print(report.format())
    return 0 if report.ok else 2


def command_download(args: argparse.Namespace) -> int:
    from carecl.data.prepare import download

    print(f"downloaded and prepared: {download(args.name, args.root)}")
    return 0
