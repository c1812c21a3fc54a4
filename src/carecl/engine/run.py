"""Whole runs: build and check everything, create (or reopen) the run directory under its lock, then
hand over to the loop; and say clearly where a run stands when it stops.

Order for a new run: every config value, the data, the backbone and the device are checked while
building the Experiment; only then is the run directory created, its lock taken, and config.yaml
written under that lock. A start that fails leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from carecl.config import ExperimentConfig, save_config
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.distributed import setup as setup_distributed
from carecl.engine.checkpointing import restore, resume_config, save_checkpoint
from carecl.engine.experiment import Experiment, seed_everything
from carecl.engine.loop import ACTIVITY, TaskWriter, TrainingError, build_run_logger, learn_all_tasks
from carecl.data.base import DatasetError
from carecl.errors import CareclError
from carecl.metrics import RunSummary
from carecl.runs.checkpoints import CheckpointError
from carecl.runs.files import write_error
from carecl.runs.directory import CONFIG_FILE, LOG_FILE, RunDirectory, RunDirectoryError, resolve_run_paths
from carecl.runs.state import RESUME_OVERRIDABLE, RunProgress, config_differences

log = logging.getLogger("carecl")
AfterTask = Callable[[RunProgress], None]


def run_experiment(config: ExperimentConfig, output: str | Path, after_task: AfterTask | None = None) -> RunSummary:
    """Build everything (failing early on bad input), then learn and evaluate task by task; `after_task(progress)`
    is called after each task's metrics are written (an exception it raises stops the run, checkpoints intact).

    Under torchrun every process runs this; rank 0 alone creates and writes the run directory.
    """
    if isinstance(config.seed, list):
        raise RunDirectoryError(f"seed is a list {config.seed}: a run group (carecl.engine.groups.run_group, or "
                                "`carecl train`, makes one run per seed)")
    distributed = setup_distributed(config.train.device)
    RunDirectory.check_available(output)
    seed_everything(config.seed)
    experiment = Experiment.build(resolve_run_paths(config, Path(output)), distributed=distributed)
    distributed.barrier()  # every rank has checked `output` before rank 0 creates it
    if not distributed.is_main:
        distributed.barrier()
        with training_session(RunDirectory(output), distributed):
            return learn_all_tasks(experiment, TaskWriter(), build_run_logger(experiment, output))
    with RunDirectory.created(output, config, class_names=experiment.data.class_names,
                              task_sizes=experiment.data.task_sizes) as run:
        distributed.barrier()
        try:
            with training_session(run, distributed, lock=False):
                describe_start(experiment)
                return learn_all_tasks(experiment, run_writer(run, experiment, after_task),
                                       build_run_logger(experiment, run.path))
        except DatasetError:
            remove_if_nothing_learned(run)
            raise


def remove_if_nothing_learned(run: RunDirectory) -> None:
    """A new run stopped by its data before its first checkpoint keeps nothing: its directory goes (the error says
    why), so the same command runs once the data are fixed."""
    if run.checkpoints.exists():
        return
    shutil.rmtree(run.path, ignore_errors=True)
    log.error("nothing was learned: %s was removed", run.path)


def describe_start(experiment: Experiment) -> None:
    config, scenario, distributed = experiment.config, experiment.scenario, experiment.distributed
    if config.train.epochs == 0 and experiment.method.trainable_parameters():
        log.warning("train.epochs is 0: no task is trained by gradient descent (what remains: the method's statistics, "
                    "closed-form heads and prototypes); the accuracy reported is that of the untrained model")
    log.info("%s on %s: %d classes in %d tasks (%s), device %s%s", config.method.name, config.data.dataset,
             scenario.n_classes, scenario.n_tasks, describe_task_sizes(list(scenario.sizes)), experiment.device,
             f", {distributed.world_size} processes" if distributed.enabled else "")


def describe_task_sizes(sizes: list[int]) -> str:
    """'10 classes each', or the first sizes then an ellipsis: 300 tasks stay on one line."""
    if len(sizes) == 1:
        return f"{sizes[0]} classes"
    if len(set(sizes[1:])) == 1:
        first = f"{sizes[0]} then " if sizes[0] != sizes[-1] else ""
        return f"{first}{sizes[-1]} classes each"
    shown = ", ".join(map(str, sizes[:8]))
    return f"sizes {shown}{', ...' if len(sizes) > 8 else ''}"


def run_writer(run: RunDirectory, experiment: Experiment, after_task: AfterTask | None = None) -> TaskWriter:
    """Checkpoints and metrics into `run` (rank 0 only)."""
    if not experiment.distributed.is_main:
        return TaskWriter()

    def write_metrics(progress: RunProgress) -> None:
        run.write_metrics(progress.evaluations, progress.metrics_extra(experiment.scenario, experiment.data.evaluated_split))

    return TaskWriter(lambda progress, state: save_checkpoint(run, experiment, progress, state), write_metrics,
                      after_task or (lambda progress: None))


def resume_experiment(output: str | Path, config: ExperimentConfig | None = None, overrides: Sequence[str] = (),
                      after_task: AfterTask | None = None) -> RunSummary:
    """Continue a run from its last complete checkpoint, to the same numbers as an uninterrupted run.

    The run's own config.yaml is the config; `config` (e.g. from --config) must equal it, and it or
    `overrides` may change only RESUME_OVERRIDABLE keys (data location, device, progress, ...).
    Everything is read and checked before anything in the run directory is touched. Under torchrun
    every rank restores the same checkpoint (the run directory must be on a shared file system).
    """
    run = RunDirectory(output)
    if not (run.path / CONFIG_FILE).is_file():
        raise RunDirectoryError(f"cannot resume {run.path}: {run.path / CONFIG_FILE} not found (not a carecl run directory)")
    config = resume_config(run, config, overrides)
    distributed = setup_distributed(config.train.device)
    with training_session(run, distributed):
        if distributed.is_main:
            run.checkpoints.remove_staging()
        checkpoint = run.resume_checkpoint()
        if checkpoint is None:  # killed before its first checkpoint: nothing to keep, start over
            log.info("resuming %s: no checkpoint yet, starting from the first task", run.path)
            seed_everything(config.seed)
            experiment = Experiment.build(resolve_run_paths(config, run.path), distributed=distributed)
            record_changes(run, config, distributed)
            return learn_all_tasks(experiment, run_writer(run, experiment, after_task),
                                   build_run_logger(experiment, run.path))
        experiment, progress, state = restore(run, checkpoint, resolve_run_paths(config, run.path))
        progress.merge_recorded(recorded_metrics(run))
        log.info("resuming %s from checkpoint %s (%d of %d tasks done)", run.path, checkpoint.name,
                 progress.n_tasks, experiment.scenario.n_tasks)
        if progress.n_tasks < experiment.scenario.n_tasks:
            record_changes(run, config, distributed)
        if distributed.is_main:
            run.repair_mirror()
        return learn_all_tasks(experiment, run_writer(run, experiment, after_task),
                               build_run_logger(experiment, run.path), progress, state)


# Resume changes config.yaml keeps: those that change what the remaining tasks compute, and where the data now are.
RECORDED_CHANGES = ("train.lr", "train.min_lr", "data.root")


def recorded_metrics(run: RunDirectory) -> dict | None:
    """metrics.json as the run last wrote it (None when absent or unreadable: evaluations are then redone)."""
    try:
        return run.metrics()
    except (OSError, ValueError):
        return None


def record_changes(run: RunDirectory, config: ExperimentConfig, distributed: Distributed) -> None:
    """Write a resume's lasting changes (a lower train.lr after a NaN, a new data.root) into config.yaml, and log them;
    operational ones (device, progress, workers, ...) apply to this session only."""
    stored = run.config()
    changed = [key for key in config_differences(stored, config) if key in RECORDED_CHANGES]
    if not changed or not distributed.is_main:
        return
    for key in changed:
        section, name = key.split(".")
        setattr(getattr(stored, section), name, getattr(getattr(config, section), name))
    config = stored
    log.info("resuming with %s changed; %s records the new values", ", ".join(changed), run.path / CONFIG_FILE)
    try:
        save_config(config, run.path / CONFIG_FILE)
    except OSError as error:
        raise write_error(run.path / CONFIG_FILE, error) from None


@contextlib.contextmanager
def training_session(run: RunDirectory, distributed: Distributed = SINGLE_PROCESS, lock: bool = True) -> Iterator[None]:
    """Lock the run directory (unless the caller holds the lock), log to its log.txt, and say where the run
    stands, and what to do next, if it stops. Only rank 0 does any of that: other ranks log warnings only."""
    if not distributed.is_main:
        with quiet_logging():
            yield
        return
    with run.lock() if lock else contextlib.nullcontext():
        handler = attach_log_file(run.path)
        try:
            with console_above_progress_bars():
                yield
        except CheckpointError as error:  # a damaged checkpoint: its own message says which file
            log.error("stopped: %s", error)
            error.reported = True  # on the console and in log.txt: the CLI does not repeat it
            raise
        except TrainingError as error:
            log.error("stopped: %s", error)
            log.error("%s; %s", where_it_stands(run), next_steps_after_divergence(run))
            error.reported = True
            raise
        except CareclError as error:
            log.error("stopped: %s", error)
            if run.checkpoints.exists() or not isinstance(error, DatasetError):  # else the new run goes (run_experiment)
                log.error("%s; continue with `carecl train --resume %s`", where_it_stands(run), run.path)
            error.reported = True
            raise
        except KeyboardInterrupt as error:
            log.error("interrupted (Ctrl-C); %s; continue with `carecl train --resume %s`", where_it_stands(run), run.path)
            error.reported = True  # the CLI prints nothing more
            raise
        except (MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            message = f"out of memory during {ACTIVITY.where}: lower {ACTIVITY.lower}"
            then = (f"continue with `carecl train --resume {run.path} --set {ACTIVITY.lower}=...`"
                    if ACTIVITY.lower in RESUME_OVERRIDABLE else "a resumed run keeps its training settings, so "
                    "start a new run with the lower value")
            log.error("stopped: %s; %s; %s", message, where_it_stands(run), then)
            stopped = OutOfMemory(message)
            stopped.reported = True
            raise stopped from None
        finally:
            log.removeHandler(handler)
            handler.close()


@contextlib.contextmanager
def console_above_progress_bars() -> Iterator[None]:
    """carecl's console lines printed above tqdm's bars, at the console handler's own level (carecl tune quietens it)."""
    consoles = [h for h in log.handlers if type(h) is not logging.FileHandler]
    level = min((h.level for h in consoles), default=logging.NOTSET)
    with logging_redirect_tqdm(loggers=[log]):
        for handler in log.handlers:
            if handler not in consoles and type(handler) is not logging.FileHandler:
                handler.setLevel(level)
        yield


class OutOfMemory(CareclError):
    """The device or the host ran out of memory; the message names what the loop was doing and what to lower."""


def out_of_memory(error: BaseException) -> bool:
    """torch's CUDA and CPU allocators, and Python's, each say it their own way."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return any(words in text for words in ("out of memory", "can't allocate memory", "not enough memory"))


def where_it_stands(run: RunDirectory) -> str:
    try:
        pointer = run.checkpoints.pointer() if run.checkpoints.exists() else None
    except CheckpointError:
        pointer = None
    return f"its last checkpoint {pointer['resume']} is intact" if pointer else "no checkpoint was written yet"


def next_steps_after_divergence(run: RunDirectory) -> str:
    config = run.config()
    lower = config.train.lr / 10
    return (f"resume the unfinished task with a lower learning rate, `carecl train --resume {run.path} "
            f"--set train.lr={lower:g}` (earlier tasks keep their results), or start a new run with a lower train.lr")


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def attach_log_file(directory: Path) -> logging.Handler:
    try:
        handler = logging.FileHandler(directory / LOG_FILE)
    except OSError as error:
        raise write_error(directory / LOG_FILE, error) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler
