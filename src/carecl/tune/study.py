"""`carecl tune`: hyperparameters chosen on validation images with Optuna, the test set never read.

A tune directory holds everything:

    DIR/tune.json        the setup: base config, search space, protocol, storage, study name
    DIR/study.db         the Optuna study (SQLite) unless --storage names another database
    DIR/trials/trial-NNNN/   one ordinary run directory per trial (eval.test_set: false: validation only)
    DIR/best.yaml, trials.csv, tune.md, plots/   written when the search ends (outputs.py)
    DIR/final/           two-stream: the chosen values run once on the evaluation stream, with its test set

A killed tune continues with `carecl tune --resume DIR`: finished trials are kept, and a trial that was
running resumes its run directory from its last checkpoint. Several processes (`--jobs N`) or machines
(`--storage URL`) share one study; the trial budget counts finished trials over all of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from carecl.config import ConfigError, TuneConfig, config_from_dict
from carecl.errors import CareclError
from carecl.formatting import format_clock
from carecl.runs.files import atomic_write_bytes
from carecl.tune.choice import best_trial
from carecl.tune.overrides import trial_config
from carecl.tune.space import SearchSpace, format_value

log = logging.getLogger("carecl")

SETUP_FILE = "tune.json"
STUDY_FILE = "study.db"
TRIALS_DIR = "trials"
RUN_DIR_ATTR = "run_dir"
STOPPED_ATTR = "stopped"
PER_TASK_ATTR = "validation_per_task"
REPEAT_ATTR = "repeat_of"


class TuneError(CareclError):
    """A tune directory or study is missing, damaged or does not match the command."""


@dataclass
class TuneSetup:
    """What a tune searches, as tune.json records it (a resume and every worker read it back)."""

    config: dict[str, Any]
    space: dict[str, Any]
    space_source: str
    storage: str
    study_name: str
    jobs: int = 1
    started: float = field(default_factory=time.time)

    @property
    def tune(self) -> TuneConfig:
        return config_from_dict(self.config).tune

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_mapping(self.space, self.space_source)

    def write(self, directory: Path) -> None:
        atomic_write_bytes(directory / SETUP_FILE, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def read(cls, directory: Path) -> "TuneSetup":
        path = directory / SETUP_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise TuneError(f"{directory} is not a tune directory ({SETUP_FILE} not found)") from None
        except (OSError, ValueError, TypeError) as error:
            raise TuneError(f"{path} cannot be read: {error}") from None


def sqlite_storage(directory: Path) -> str:
    return f"sqlite:///{(directory / STUDY_FILE).resolve()}"


def open_study(setup: TuneSetup, create: bool):
    """The setup's Optuna study (created on a new tune), with its sampler and pruner."""
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    tune = setup.tune
    if tune.sampler == "grid":
        sampler = optuna.samplers.GridSampler(setup.search_space().grid(), seed=tune.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=tune.seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
              if tune.protocol == "stream" and tune.prune else optuna.pruners.NopPruner())
    # A long timeout: several processes write one SQLite file in turn.
    storage = RDBStorage(setup.storage, engine_kwargs={"connect_args": {"timeout": 120}}
                         if setup.storage.startswith("sqlite") else {})
    try:
        return optuna.create_study(storage=storage, study_name=setup.study_name, direction="maximize", sampler=sampler,
                                   pruner=pruner, load_if_exists=not create)
    except optuna.exceptions.DuplicatedStudyError:
        raise TuneError(f"the storage already holds a study named {setup.study_name!r}: continue it with "
                        "`carecl tune --resume DIR`, or name another with --study") from None


def budget(setup: TuneSetup) -> int:
    """Trials to finish: tune.trials, or the grid's size when that is smaller."""
    trials = setup.tune.trials
    if setup.tune.sampler == "grid":
        trials = min(trials, setup.search_space().grid_size())
    return trials


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def requeue_interrupted(study) -> int:
    """Trials a stopped process left unfinished, queued again with their values and their run directory (to be
    resumed): those still marked running (killed) and those marked failed (Ctrl-C, an error) whose values no other
    trial has finished or holds; a failed grid point would otherwise count as visited and never run. Only for a tune
    no other process is working on."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    settled = {values_of(trial) for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING))}
    requeued = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        values = values_of(trial)
        if values in settled:
            continue
        settled.add(values)
        study.enqueue_trial(trial.params, user_attrs={RUN_DIR_ATTR: trial.user_attrs.get(RUN_DIR_ATTR)},
                            skip_if_exists=False)
        requeued += 1
    return requeued


def values_of(trial) -> tuple:
    """A trial's values; a queued trial has none yet, only the ones it was queued with."""
    return tuple(sorted((trial.params or trial.system_attrs.get("fixed_params", {})).items()))


class Objective:
    """One trial: its config from the setup and the trial's values, one run directory, its validation score."""

    def __init__(self, setup: TuneSetup, directory: Path, threads: int | None = None) -> None:
        self.setup, self.directory, self.threads = setup, directory, threads
        self.space = setup.search_space()
        self.tune = setup.tune

    def config(self, values: dict[str, Any]):
        tune = self.tune
        stream = tune.stream if tune.protocol == "two-stream" else []
        max_tasks = tune.tasks if tune.protocol == "first-task" else None
        config = trial_config(self.setup.config, values, stream=stream, max_tasks=max_tasks)
        if self.threads is not None and config.train.threads is None:
            config.train.threads = self.threads
        return config

    def __call__(self, trial) -> float:
        from carecl.engine.loop import TrainingError

        values = self.space.suggest(trial)
        twin = finished_twin(trial, values)
        if twin is not None:  # the same values, seed and protocol would train the same run again
            return repeat(trial, twin)
        config = self.config(values)
        earlier = trial.user_attrs.get(RUN_DIR_ATTR)
        run_dir = Path(earlier) if earlier else self.directory / TRIALS_DIR / f"trial-{trial.number:04d}"
        trial.set_user_attr(RUN_DIR_ATTR, str(run_dir))
        report = self.reporter(trial)
        try:
            with console_quiet():
                summary = self.run(config, run_dir, report)
        except TrainingError as error:  # a diverged loss is an outcome of these values, the worst one
            trial.set_user_attr(STOPPED_ATTR, str(error).splitlines()[0])
            return 0.0
        trial.set_user_attr(PER_TASK_ATTR, per_task_accuracy(summary))
        return self.score(summary)

    @staticmethod
    def run(config, run_dir: Path, report):
        """The trial's run, or the rest of it when a killed tune left it unfinished."""
        from carecl.engine import resume_experiment, run_experiment

        if (run_dir / "config.yaml").is_file():
            return resume_experiment(run_dir, after_task=report)
        return run_experiment(config, run_dir, after_task=report)

    def score(self, summary) -> float:
        value = summary.a_last if self.tune.metric == "a_last" else summary.average_accuracy
        return 0.0 if value is None or not math.isfinite(value) else float(value)

    def reporter(self, trial):
        """After each task: the validation accuracy to the study, and a pruned trial stops its run."""
        import optuna

        def report(progress) -> None:
            if self.tune.protocol != "stream" or not progress.evaluations:
                return
            latest = progress.evaluations[-1]
            trial.report(latest.top1, step=latest.task)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {latest.top1:.2f} after task {latest.task + 1}")

        return report


def finished_twin(trial, values: dict[str, Any]):
    """A completed trial of the study that had exactly these values (TPE may draw a list's choices again)."""
    from optuna.trial import TrialState

    twins = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.params == values]
    return twins[0] if twins else None


def repeat(trial, twin) -> float:
    """The trial takes its twin's score, run directory and per-task accuracies instead of training again."""
    for key in (RUN_DIR_ATTR, PER_TASK_ATTR, STOPPED_ATTR):
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    trial.set_user_attr(REPEAT_ATTR, twin.number)
    return twin.value


def per_task_accuracy(summary) -> list[float]:
    """Each learned task's validation accuracy at the trial's last evaluation: a task already lost shows here."""
    if not summary.matrix:
        return []
    learned = summary.matrix[-1][:summary.evaluated_tasks[-1] + 1]
    return [round(float(value), 2) for value in learned if math.isfinite(value)]


@contextlib.contextmanager
def console_quiet() -> Iterator[None]:
    """A trial's run logs to its own log.txt; the console keeps the tune's one line per trial (and warnings)."""
    handlers = [h for h in log.handlers if type(h) is not logging.FileHandler]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


class ProgressLine:
    """One log line per finished trial: its value and values, the trial best.yaml would take so far, and an ETA."""

    def __init__(self, setup: TuneSetup) -> None:
        self.config, self.tolerance = setup.config, setup.tune.tolerance
        self.total, self.jobs = budget(setup), setup.jobs
        self.started, self.seen = time.perf_counter(), 0

    def __call__(self, study, trial) -> None:
        done = len(finished(study))
        self.seen += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.seen * max(self.total - done, 0) / self.jobs
        values = "  ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        value = "pruned" if trial.value is None else f"{trial.value:.2f}"
        stopped = f" ({trial.user_attrs[STOPPED_ATTR]})" if STOPPED_ATTR in trial.user_attrs else ""
        chosen = best_trial(study, self.config, self.tolerance)
        best = "no finished trial yet" if chosen is None else f"best {chosen.value:.2f} (trial {chosen.number})"
        log.info("trial %d (%d/%d)  %s%s  %s  %s  ETA %s", trial.number, done, self.total, value, stopped, values,
                 best, format_clock(eta))


def work(setup: TuneSetup, directory: Path, threads: int | None = None) -> None:
    """Run trials on the shared study, one at a time, until the finished and running trials fill the budget (a
    second process never starts a trial beyond it; a queued trial, a killed one to be resumed, always runs)."""
    from optuna.trial import TrialState

    study = open_study(setup, create=False)
    total, objective, line = budget(setup), Objective(setup, directory, threads), ProgressLine(setup)
    while True:
        taken = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if len(taken) >= total and not waiting:
            return
        study.optimize(objective, n_trials=1, gc_after_trial=True, callbacks=[line])
        if setup.tune.sampler == "grid" and len(finished(study)) >= total:
            return


def start(setup: TuneSetup, directory: Path) -> None:
    """A new tune: check the space against the config, create the directory and the study, then search."""
    setup.search_space().check_against(setup.config)
    Objective(setup, directory).config({p.key: p.values_to_check()[0] for p in setup.search_space().parameters})
    if (directory / SETUP_FILE).exists():
        raise TuneError(f"{directory} already holds a tune: continue it with `carecl tune --resume {directory}`")
    directory.mkdir(parents=True, exist_ok=True)
    open_study(setup, create=True)
    setup.write(directory)
    search(setup, directory)


def resume(directory: Path, storage: str | None = None, jobs: int | None = None) -> TuneSetup:
    setup = TuneSetup.read(directory)
    if storage is not None:
        setup.storage = storage
    if jobs is not None:
        setup.jobs = jobs
    study = open_study(setup, create=False)
    requeued = requeue_interrupted(study)
    log.info("resuming the tune in %s: %d of %d trials finished%s", directory, len(finished(study)), budget(setup),
             f", {requeued} interrupted trial(s) to be resumed" if requeued else "")
    search(setup, directory)
    return setup


def search(setup: TuneSetup, directory: Path) -> None:
    """Work on the study here, with `setup.jobs - 1` more worker processes beside this one."""
    threads = max(1, (os.cpu_count() or 1) // setup.jobs) if setup.jobs > 1 else None
    command = [sys.executable, "-m", "carecl", "tune", "--join", str(directory), "--storage", setup.storage]
    workers = [subprocess.Popen([*command, *(["--threads-per-job", str(threads)] if threads else [])])
               for _ in range(setup.jobs - 1)]
    try:
        work(setup, directory, threads)
    finally:
        failed = [worker.wait() for worker in workers]
    if any(failed):
        raise TuneError(f"{sum(1 for code in failed if code)} worker process(es) stopped with an error (see above)")


def check_setup(setup: TuneSetup) -> None:
    """Errors in the tune's own settings before anything is created."""
    if setup.tune.sampler == "grid":
        setup.search_space().grid()
    if setup.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {setup.jobs}")
