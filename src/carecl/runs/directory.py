"""The run directory: resolved config, metrics, log and crash-safe checkpoints (see carecl.runs.checkpoints)."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from carecl.runs.checkpoints import (
    CHECKPOINTS_DIR,
    LEARNER_INFO,
    LEARNER_TENSORS,
    TRAINER_INFO,
    TRAINER_TENSORS,
    Checkpoint,
    CheckpointStore,
)
from carecl.runs.files import atomic_write_bytes, json_safe, write_error
from carecl.config import ASSET_PREFIX, ExperimentConfig, config_to_dict, load_config
from carecl.errors import CareclError
from carecl.metrics import RunSummary, TaskEvaluation

CONFIG_FILE = "config.yaml"
# The dataset's classes (count and names), so that a finished run predicts without its dataset.
CLASSES_FILE = "classes.json"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
# Copies (hard links) of the last finished task's learner, for tools that read the run's root.
STATE_FILE = LEARNER_TENSORS
STATE_INFO = LEARNER_INFO
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"


class RunDirectoryError(CareclError, ValueError):
    """A run directory is missing, incomplete, busy, or holds a different run."""


@dataclass(frozen=True)
class RunClasses:
    """The dataset's classes as a run recorded them in classes.json: what prediction needs of the dataset."""

    n_classes: int
    # By original class id; None when unknown (a release checkpoint imported without them).
    names: tuple[str, ...] | None = None
    # A multi-domain stream's members' class counts (its tasks); None: tasks from data.init_cls / increment.
    # Classes learned later (data.additions) follow the members' (or the dataset's) classes.
    task_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.names is not None and len(self.names) != self.n_classes:
            raise RunDirectoryError(f"{len(self.names)} class names given for {self.n_classes} classes")

    def names_by_id(self) -> list[str]:
        """The names; `class <id>` where they are unknown."""
        if self.names is not None:
            return list(self.names)
        return [f"class {class_id}" for class_id in range(self.n_classes)]

    def difference(self, class_names: Sequence[str]) -> str | None:
        """How a dataset's class names disagree with these classes, or None when they fit."""
        if len(class_names) != self.n_classes:
            return f"{self.n_classes} classes recorded, {len(class_names)} in the dataset"
        if self.names is None or list(self.names) == list(class_names):
            return None
        class_id = next(i for i, (a, b) in enumerate(zip(self.names, class_names)) if a != b)
        return f"class {class_id} is {self.names[class_id]!r} in the record, {class_names[class_id]!r} in the dataset"

    def to_json(self) -> dict[str, Any]:
        document = {"n_classes": self.n_classes, "names": list(self.names) if self.names is not None else None}
        if self.task_sizes is not None:
            document["task_sizes"] = list(self.task_sizes)
        return document

    @classmethod
    def from_json(cls, document: Any, source: Path) -> "RunClasses":
        n_classes = document.get("n_classes") if isinstance(document, dict) else None
        names = document.get("names") if isinstance(document, dict) else None
        sizes = document.get("task_sizes") if isinstance(document, dict) else None
        valid = (type(n_classes) is int and n_classes > 0 and (names is None or (
            isinstance(names, list) and len(names) == n_classes and all(isinstance(n, str) for n in names))))
        valid = valid and (sizes is None or (isinstance(sizes, list) and all(type(n) is int and n > 0 for n in sizes)
                                             and sum(sizes) <= n_classes))
        if not valid:
            raise RunDirectoryError(f"{source}: expected n_classes (a positive integer), names (a list of n_classes "
                                    "strings, or null) and optionally task_sizes (positive integers summing to at most "
                                    "n_classes: the stream's members; classes learned later follow them)")
        return cls(n_classes, tuple(names) if names is not None else None, tuple(sizes) if sizes is not None else None)


# A data path written `run:PATH` lies inside the run directory (images a ContinualLearner was given as a list or
# dataset are stored there), so the run can be moved or copied and still find them.
RUN_PREFIX = "run:"


def resolve_run_paths(config: ExperimentConfig, run_path: Path) -> ExperimentConfig:
    """`config` with every `run:` data path made absolute within `run_path`, and a relative backbone.weights naming a
    file inside the run resolved there (an imported release checkpoint carries its backbone)."""
    config = copy.deepcopy(config)

    def inside(path: str | None) -> str | None:
        if path and path.startswith(RUN_PREFIX):
            return str((run_path / path[len(RUN_PREFIX):]).resolve())
        return path

    config.data.root = inside(config.data.root)
    for addition in config.data.additions or []:
        addition.root = inside(addition.root)
    weights = config.backbone.weights
    local = weights and not weights.startswith(ASSET_PREFIX) and not Path(weights).is_absolute()
    if local and (run_path / weights).is_file():
        config.backbone.weights = str((run_path / weights).resolve())
    return config


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = CheckpointStore(self.path)

    # ---- creating and opening -------------------------------------------------------
    @staticmethod
    def holds_run(path: str | Path) -> bool:
        path = Path(path)
        return any((path / name).exists() for name in (CONFIG_FILE, METRICS_JSON, CHECKPOINTS_DIR))

    @classmethod
    def check_available(cls, path: str | Path) -> None:
        """Fail before any work if `path` holds a run or cannot be created/written."""
        path = Path(path)
        if cls.holds_run(path):
            raise RunDirectoryError(
                f"output directory {path} already holds a run; choose another --output, "
                f"or continue it with `carecl train --resume {path}`"
            )
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise RunDirectoryError(f"output directory {path}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RunDirectoryError(f"output directory {path}: {existing} is not writable")

    @classmethod
    @contextlib.contextmanager
    def created(cls, path: str | Path, config: ExperimentConfig, class_names: Sequence[str] | None = None,
                n_classes: int | None = None, task_sizes: Sequence[int] | None = None) -> Iterator["RunDirectory"]:
        """A new run directory, locked for the block: config.yaml and (given `class_names`, the dataset's by
        class id, or only `n_classes`) classes.json are written only once the lock is held, so two runs
        started on one directory at the same instant can never mix their files."""
        cls.check_available(path)
        run = cls(path)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(run.path, error) from None
        with run.lock():
            if cls.holds_run(run.path):  # another process created it since the check above
                raise RunDirectoryError(f"output directory {run.path} already holds a run; choose another --output, "
                                        f"or continue it with `carecl train --resume {run.path}`")
            if class_names is not None or n_classes is not None:
                names = tuple(class_names) if class_names is not None else None
                run.write_classes(RunClasses(n_classes if n_classes is not None else len(names), names,
                                             tuple(task_sizes) if task_sizes is not None else None))
            atomic_write_bytes(run.path / CONFIG_FILE, yaml.safe_dump(config_to_dict(config), sort_keys=False).encode())
            yield run

    @classmethod
    def create(cls, path: str | Path, config: ExperimentConfig, class_names: Sequence[str] | None = None,
               n_classes: int | None = None) -> "RunDirectory":
        """`created`, for a directory that nothing trains (an imported model): the lock is released at once."""
        with cls.created(path, config, class_names, n_classes) as run:
            return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        """A run directory with at least one finished task (for evaluation and export)."""
        run = cls(path)
        if not (run.path / CONFIG_FILE).is_file():
            raise RunDirectoryError(f"{run.path / CONFIG_FILE} not found: not a carecl run directory")
        pointer = run.checkpoints.pointer() or (run.checkpoints.recovered_pointer() if run.checkpoints.exists() else None)
        if pointer is None:
            raise RunDirectoryError(f"{run.path} holds no checkpoint ({run.checkpoints.pointer_path} not found): "
                                    "not a finished carecl run directory")
        if pointer.get("task_end") is None:
            raise RunDirectoryError(f"{run.path} has no finished task yet (only a mid-task checkpoint); "
                                    f"continue it with `carecl train --resume {run.path}`")
        return run

    def config(self) -> ExperimentConfig:
        return load_config(self.path / CONFIG_FILE)

    # ---- classes --------------------------------------------------------------------
    def write_classes(self, classes: RunClasses) -> None:
        atomic_write_bytes(self.path / CLASSES_FILE, json.dumps(classes.to_json(), indent=2).encode())

    def classes(self) -> RunClasses | None:
        """The recorded classes; None for a run written before classes.json existed."""
        path = self.path / CLASSES_FILE
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise RunDirectoryError(f"{path} is unreadable: {error}") from None
        return RunClasses.from_json(document, path)

    def config_for_loading(self, data_overrides: Sequence[str] = ()) -> ExperimentConfig:
        """`config()` for rebuilding the run elsewhere: `data_overrides` (`data.<key>=value` only, e.g. after
        the dataset moved) applied, and a relative `backbone.weights` naming a file inside the run resolved
        there (an imported release checkpoint carries its backbone), so the run loads wherever it is moved."""
        outside = [item for item in data_overrides if not item.strip().startswith("data.")]
        if outside:
            raise RunDirectoryError(f"only data.* keys can change when loading the finished run {self.path}; "
                                    f"refused: {', '.join(outside)}")
        return resolve_run_paths(load_config(self.path / CONFIG_FILE, data_overrides), self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run directory (two processes must never train one run)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks
            yield
            return
        path = self.path / LOCK_FILE
        try:
            handle = open(path, "a")
        except OSError as error:
            raise write_error(path, error) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunDirectoryError(f"run directory {self.path} is in use by another carecl process ({path} is locked)") from None
            yield
        finally:
            handle.close()

    # ---- metrics --------------------------------------------------------------------
    def write_metrics(self, evaluations: list[TaskEvaluation], extra: dict[str, Any]) -> RunSummary:
        summary = RunSummary.from_evaluations(evaluations)
        document = {"summary": summary.__dict__, "tasks": [e.__dict__ for e in evaluations], **extra}
        atomic_write_bytes(self.path / METRICS_JSON, json.dumps(json_safe(document), indent=2).encode())
        atomic_write_bytes(self.path / METRICS_CSV, metrics_csv(evaluations).encode())
        return summary

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.path / METRICS_JSON).read_text())

    # ---- checkpoints ----------------------------------------------------------------
    def save_state(
        self,
        tensors: dict[str, torch.Tensor],
        info: dict[str, Any],
        *,
        trainer_tensors: dict[str, torch.Tensor] | None = None,
        trainer_info: dict[str, Any] | None = None,
    ) -> str:
        """Write a checkpoint (learner tensors + info; the engine adds its trainer state) and switch to it.

        `info["position"]` (engine only) marks a mid-task checkpoint: a resume point, not a finished task.
        The previous checkpoint stays valid until the new one is complete. Returns the checkpoint's name.
        """
        position = info.get("position")
        task_end = position is None
        name = checkpoint_name(int(info["n_learned_tasks"]), position)
        files_tensors = {LEARNER_TENSORS: tensors}
        documents: dict[str, Any] = {LEARNER_INFO: info}
        if trainer_tensors is not None:
            files_tensors[TRAINER_TENSORS] = trainer_tensors
        if trainer_info is not None:
            documents[TRAINER_INFO] = trainer_info
        written = self.checkpoints.write(name, files_tensors, documents, task_end=task_end)
        if task_end:
            self._mirror_learner(written)
        return written

    def load_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The learner of the last finished task: (tensors, info), verified against the manifest."""
        if not self.checkpoints.exists():
            raise RunDirectoryError(f"{self.path} holds no checkpoint ({self.checkpoints.pointer_path} not found)")
        checkpoint = self.checkpoints.open("task_end")
        if checkpoint is None:
            raise RunDirectoryError(f"{self.path} has no finished task yet (only a mid-task checkpoint)")
        return checkpoint.tensors(LEARNER_TENSORS), checkpoint.document(LEARNER_INFO)

    def resume_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint (possibly mid-task), verified; None when none was written yet."""
        return self.checkpoints.open("resume")

    def _mirror_learner(self, name: str) -> None:
        """Hard-link (or copy) the finished task's learner files to the run's root, atomically per file."""
        for file in (LEARNER_TENSORS, LEARNER_INFO):
            source, target = self.checkpoints.root / name / file, self.path / file
            temporary = self.path / f".{file}.tmp"
            try:
                temporary.unlink(missing_ok=True)
                try:
                    os.link(source, temporary)
                except OSError:  # no hard links on this filesystem
                    shutil.copyfile(source, temporary)
                os.replace(temporary, target)
            except OSError as error:
                temporary.unlink(missing_ok=True)
                raise write_error(target, error) from None

    def repair_mirror(self) -> None:
        """Re-link the root learner files if a crash came between a checkpoint and its mirror."""
        pointer = self.checkpoints.pointer()
        if not pointer or not pointer.get("task_end"):
            return
        source = self.checkpoints.root / str(pointer["task_end"]) / LEARNER_TENSORS
        target = self.path / LEARNER_TENSORS
        if not (target.is_file() and source.is_file() and os.path.samefile(source, target)):
            self._mirror_learner(str(pointer["task_end"]))


def checkpoint_name(n_learned_tasks: int, position: dict[str, int] | None) -> str:
    """`learned-0003` after three tasks; `learned-0003-phase-1-epoch-0004` inside the fourth."""
    name = f"learned-{n_learned_tasks:04d}"
    if position is None:
        return name
    return f"{name}-phase-{position['phase']}-epoch-{position['epoch']:04d}"


def metrics_csv(evaluations: list[TaskEvaluation]) -> str:
    n_groups = max((len(e.group_accuracy) for e in evaluations), default=0)
    stream = io.StringIO()
    writer = csv.writer(stream)
    writer.writerow(
        ["task", "n_samples", "top1", f"top{evaluations[0].k if evaluations else 5}", "old", "new"]
        + [f"group_{g}" for g in range(n_groups)]
    )
    for e in evaluations:
        groups = [f"{a:.4f}" for a in e.group_accuracy] + [""] * (n_groups - len(e.group_accuracy))
        writer.writerow([e.task, e.n_samples, f"{e.top1:.4f}", f"{e.topk:.4f}", _fmt(e.old_accuracy), _fmt(e.new_accuracy), *groups])
    return stream.getvalue()


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"
