"""`carecl tune`: choose hyperparameters on validation images, never the test set (docs/tuning.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PROTOCOLS = ("first-task", "stream", "two-stream")


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tune", help="choose hyperparameters on a validation split (Optuna), never reading the test set",
        description="Search the keys of SPACE.yaml: every trial is a run on validation images held out of the "
                    "training images (data.validation_fraction), scored by the protocol; the best values go to "
                    "DIR/best.yaml (re-runnable with carecl train), with trials.csv, plots and tune.md.")
    parser.add_argument("--config", type=Path, help="the YAML config to tune (a new tune)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set tune.tasks=2 (repeatable)")
    parser.add_argument("--space", type=Path, metavar="SPACE.yaml",
                        help="dotted config keys -> a list of choices or {low, high[, log][, step]}")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="tune.protocol (default: first-task)")
    parser.add_argument("--trials", type=int, metavar="N", help="tune.trials: trials to finish (default 16)")
    parser.add_argument("--sampler", choices=("auto", "tpe", "grid"),
                        help="tune.sampler (default auto: grid when every key is a list of choices whose combinations "
                             "fit in the trials, else tpe)")
    parser.add_argument("--output", type=Path, metavar="DIR", help="the tune directory (created)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue a stopped tune; finished trials are kept")
    parser.add_argument("--jobs", type=int, metavar="N", help="trials run in parallel, one process each (default 1)")
    parser.add_argument("--storage", metavar="URL",
                        help="the study's database (default: sqlite in DIR); a shared one lets machines work together")
    parser.add_argument("--study", metavar="NAME", help="the study's name in the storage (default: DIR's name)")
    parser.add_argument("--join", type=Path, metavar="DIR",
                        help="work on a tune that another process or machine runs (DIR holds its tune.json), leaving its "
                             "running trials alone; with --storage for a shared database")
    parser.add_argument("--threads-per-job", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(handler=command_tune)


def tune_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"tune.protocol": args.protocol, "tune.trials": args.trials, "tune.sampler": args.sampler}
    return [*args.overrides, *(f"{key}={value}" for key, value in flags.items() if value is not None)]


def command_tune(args: argparse.Namespace) -> int:
    from carecl.errors import CareclError
    from carecl.tune import outputs, study

    if args.join is not None:
        setup = study.TuneSetup.read(args.join)
        setup.storage = args.storage or setup.storage
        study.work(setup, args.join, threads=args.threads_per_job)
        return 0
    if args.resume is not None:
        if args.config or args.space or args.output:
            raise CareclError("carecl tune --resume DIR takes the tune's own config and space: drop --config, --space "
                              "and --output")
        directory = args.resume
        setup = study.resume(directory, args.storage, args.jobs)
    else:
        if args.config is None or args.space is None or args.output is None:
            raise CareclError("carecl tune needs --config FILE --space SPACE.yaml --output DIR (or --resume DIR)")
        directory = args.output
        setup = new_setup(args)
        study.start(setup, directory)
    found = study.open_study(setup, create=False)
    final = outputs.run_final(setup, directory, found) if setup.tune.protocol == "two-stream" else None
    best = outputs.write_outputs(setup, directory, found, final)
    print(f"best: {best}")
    print(f"summary: {directory / outputs.SUMMARY_FILE}")
    return 0


def new_setup(args: argparse.Namespace):
    from carecl.compat.release_json import load_experiment_file
    from carecl.config import config_to_dict
    from carecl.tune.space import SearchSpace
    from carecl.tune.study import TuneSetup, check_setup, sqlite_storage

    config, _ = load_experiment_file(args.config, tune_overrides(args))
    if isinstance(config.seed, list):
        from carecl.errors import CareclError

        raise CareclError(f"seed is a list {config.seed}: a tune searches with one seed (set seed: N)")
    space = SearchSpace.read(args.space)
    document = config_to_dict(config)
    if config.tune.sampler == "auto":  # resolved once: tune.json, tune.md and best.yaml name the sampler that ran
        document["tune"]["sampler"] = space.sampler_for(config.tune.trials)
    setup = TuneSetup(config=document, space={p.key: parameter_document(p) for p in space.parameters},
                      space_source=str(args.space), storage=args.storage or sqlite_storage(args.output),
                      study_name=args.study or args.output.resolve().name, jobs=args.jobs or 1)
    check_setup(setup)
    return setup


def parameter_document(parameter) -> Any:
    if parameter.choices is not None:
        return list(parameter.choices)
    document = {"low": parameter.low, "high": parameter.high, "log": parameter.log}
    return document if parameter.step is None else {**document, "step": parameter.step}
