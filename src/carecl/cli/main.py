"""The `carecl` command line: the parser, `train`, `demo` and `eval`; the other commands live beside this
file (report, compat, diagnose, predict), each registering itself with `add_command(subparsers)`.

Every user-facing error (a CareclError) is printed as one line on stderr with exit status 2;
Ctrl-C stops with one line saying how to resume, and exit status 130. Log lines go to stderr,
so a command's standard output holds only its results.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from carecl.cli.common import add_config_arguments, add_data_arguments, data_overrides
from carecl.errors import CareclError

log = logging.getLogger("carecl")

# Modules that register further subcommands; each defines `add_command(subparsers)`.
COMMAND_MODULES = ("carecl.cli.report", "carecl.cli.compare", "carecl.cli.data", "carecl.cli.compat", "carecl.cli.diagnose",
                   "carecl.cli.predict", "carecl.cli.tune", "carecl.cli.learn")

# What `carecl train --resume` may change (runs.state.RESUME_OVERRIDABLE, plus train.lr for the unfinished task).
RESUME_HELP = ("continue a stopped run from its last checkpoint; its config.yaml is the config, and --set may change "
               "only where the data live and how the loop runs (data.root, data.num_workers, data.pin_memory, "
               "data.persistent_workers, data.strict, train.device, train.threads, train.progress, "
               "train.checkpoint_every_epochs, train.compile, eval.every_n_tasks, eval.batch_size, logging.*), "
               "or lower train.lr / train.min_lr for the tasks still to learn (after a diverged loss)")

DESCRIPTION = """\
carecl: class-incremental learning on frozen Vision Transformers (CaRE and baselines).

examples:
  carecl demo                                   a whole run on scikit-learn's digits (about 25 s on 2 CPU cores)
  carecl train --config configs/care/imagenet-r_b0inc10.yaml --set data.root=/data
  carecl train --config exps/care_inr.json      a release (PILOT-style) JSON file, keys reported
  carecl eval --run runs/demo                   re-evaluate a finished run
"""


def demo_config_path() -> Path:
    return Path(str(resources.files("carecl") / "configs" / "demo.yaml"))


def default_output(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carecl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run a class-incremental experiment from a config file, or resume one")
    train.add_argument("--config", type=Path, help="YAML config, or a release JSON experiment file")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help=RESUME_HELP)
    train.add_argument("--seeds", metavar="S1,S2,...",
                       help="a run group: one run per seed under --output (seed-<S>/), with mean ± std in group.json")
    train.add_argument("--strict-data", action="store_true",
                       help="stop at the first unreadable image (data.strict=true) instead of skipping and counting it")
    add_config_arguments(train)
    train.set_defaults(handler=command_train)

    demo = commands.add_parser("demo", help="the embedded demo: CaRE on scikit-learn digits, 5 tasks, about 25 s on 2 CPU cores")
    demo.add_argument("--seeds", metavar="S1,S2,...", help="a seed group of the demo: one run per seed, mean ± std")
    add_config_arguments(demo)
    demo.set_defaults(handler=command_demo)

    evaluate = commands.add_parser("eval", help="re-evaluate a finished run on all its seen classes")
    evaluate.add_argument("--run", type=Path, required=True, help="run directory written by carecl train/demo")
    add_data_arguments(evaluate)
    evaluate.set_defaults(handler=command_eval)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_command(commands)
    return parser


def command_train(args: argparse.Namespace) -> int:
    from carecl.compat.release_json import load_experiment_file
    from carecl.config import ConfigError, blame

    overrides = [*args.overrides, *(["data.strict=true"] if args.strict_data else []),
                 *([f"seed=[{parse_seeds(args.seeds)}]"] if args.seeds else [])]
    if args.resume is None and args.config is None:
        raise CareclError("carecl train needs --config FILE (a new run) or --resume RUN_DIR (continue one)")
    if args.resume is not None and args.output is not None and args.output.resolve() != args.resume.resolve():
        raise CareclError(f"--output {args.output} and --resume {args.resume} disagree: a resumed run stays in its directory")
    config = None
    if args.config is not None:
        config, report = load_experiment_file(args.config, overrides)
        if report is not None:
            print(report.format(), file=sys.stderr)
    from carecl.engine.groups import group_seeds
    from carecl.runs.group import is_group

    if args.resume is not None and is_group(args.resume):
        return run_group_and_report(None, args.resume, overrides)
    if args.resume is not None:
        return run_and_report(config, args.resume, resume=True, overrides=overrides)
    output = args.output or default_output(config.method.name)
    try:
        if group_seeds(config) is not None:
            return run_group_and_report(config, output)
        return run_and_report(config, output)
    except CareclError as error:  # found while building the run: a value that does not fit the data or the machine
        source = blame(str(error), overrides, "")
        if getattr(error, "reported", False) or not source:
            raise
        raise ConfigError(f"{source}: {error}") from None


def parse_seeds(text: str) -> str:
    """`1993,1994` -> "1993, 1994" (checked to be distinct integers)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CareclError(f"--seeds {text!r} must be comma-separated integers, e.g. 1993,1994,1995") from None
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise CareclError(f"--seeds {text} lists {', '.join(map(str, repeated))} more than once: each seed is one run")
    return ", ".join(map(str, seeds))


def run_group_and_report(config, output: Path, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Run (config given) or resume (config None) a seed group and print one line per seed and the mean ± std."""
    from carecl.engine.groups import resume_group, run_group
    from carecl.runs.group import MeanStd

    summaries = run_group(config, output) if config is not None else resume_group(output, overrides)
    for seed, summary in summaries.items():
        print(f"seed {seed}: A_last {summary.a_last:.2f}   Ā {summary.average_accuracy:.2f}   "
              f"forgetting {summary.forgetting:.2f}")
    stats = {key: MeanStd.of([getattr(s, key) for s in summaries.values()])
             for key in ("a_last", "average_accuracy", "forgetting")}
    print(f"mean ± std over {len(summaries)} seeds: A_last {stats['a_last'].format()}   "
          f"Ā {stats['average_accuracy'].format()}   forgetting {stats['forgetting'].format()}")
    print(f"group directory: {output} (group.json; `carecl report {output}` for the figures)")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from carecl.config import load_config

    seeds = [f"seed=[{parse_seeds(args.seeds)}]"] if args.seeds else []
    config = load_config(demo_config_path(), [*args.overrides, *seeds])
    output = args.output or default_output("demo")
    return run_group_and_report(config, output) if isinstance(config.seed, list) else run_and_report(config, output)


def run_and_report(config, output: Path, resume: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Run (or with `resume`, continue: `config` then only checks) an experiment and print its accuracy table."""
    from carecl.distributed import current, teardown
    from carecl.engine.run import resume_experiment, run_experiment
    from carecl.report.text import accuracy_table

    try:
        summary = resume_experiment(output, config, overrides) if resume else run_experiment(config, output)
        if current().is_main:
            print(accuracy_table(summary))
            print(f"run directory: {output}")
    finally:
        teardown()
    return 0


def command_eval(args: argparse.Namespace) -> int:
    from carecl.engine.checkpointing import load_experiment
    from carecl.engine.evaluation import evaluate
    from carecl.runs.directory import RunDirectory

    run = RunDirectory.open(args.run)
    experiment = load_experiment(run, data_overrides=data_overrides(args))
    task = experiment.scenario.task(experiment.method.n_learned_tasks - 1)
    result = evaluate(experiment.method, experiment.test_loader(task.high), experiment.device, task.index,
                      experiment.config.eval.topk)
    try:
        recorded = f"{run.metrics()['tasks'][-1]['top1']:.2f}"
    except (FileNotFoundError, IndexError, KeyError):
        recorded = "-"  # an imported run (carecl import-reference) has no recorded metrics
    print(f"after task {task.index + 1}/{experiment.scenario.n_tasks}: top1 {result.top1:.2f} (recorded {recorded}), "
          f"top{result.k} {result.topk:.2f}, old {result.old_accuracy:.2f}, new {result.new_accuracy:.2f}")
    return 0


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (never to a stream replaced since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool) -> None:
    """carecl's log lines on stderr, so stdout holds only results; timm's informational messages
    (e.g. position-embedding resizing) hidden unless --verbose."""
    for handler in [h for h in log.handlers if isinstance(h, ConsoleHandler)]:
        log.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("timm").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except CareclError as error:
        if not getattr(error, "reported", False):  # a run's error is already on the console and in its log.txt
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        if not getattr(error, "reported", False):
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
