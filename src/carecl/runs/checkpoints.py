"""Crash-safe checkpoints: safetensors + JSON folders with a SHA-256 manifest, switched atomically.

    <run>/checkpoints/latest.json            {"resume": NAME, "task_end": NAME}  (the only pointer)
    <run>/checkpoints/NAME/manifest.json     SHA-256 and size of every file below
    <run>/checkpoints/NAME/learner.safetensors, learner.json[, trainer.safetensors, trainer.json]

A checkpoint is written into a temporary folder (every file fsynced), renamed to NAME, and only
then does `latest.json` switch to it (temporary file, fsync, rename, fsync of the folder); older
folders are deleted last. A crash at any moment leaves the previous pointer and the folders it
names intact. Nothing here unpickles: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from carecl.errors import CareclError
from carecl.runs.files import (CheckpointWriteError, atomic_write_bytes, fsync_directory, json_bytes, sha256_file,
                               write_error, write_json, write_tensors)

log = logging.getLogger("carecl")

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
POINTER_FILE = "latest.json"
MANIFEST_FILE = "manifest.json"
LEARNER_TENSORS = "learner.safetensors"
LEARNER_INFO = "learner.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_INFO = "trainer.json"
# Environment variable naming a point (e.g. task1/train/epoch0/batch3) where the process SIGKILLs itself.
KILL_AT_ENV = "CARECL_TEST_KILL_AT"


class CheckpointError(CareclError, ValueError):
    """A checkpoint is missing, truncated, modified or does not fit; the message names the file."""


def kill_point(label: str) -> None:
    """Test hook: SIGKILL this process when CARECL_TEST_KILL_AT names `label` (crash/resume tests)."""
    if os.environ.get(KILL_AT_ENV) == label:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the store


@dataclass
class Checkpoint:
    """One verified checkpoint folder (every file's SHA-256 checked against its manifest)."""

    name: str
    path: Path
    files: list[str]

    def tensors(self, file: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / file))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"checkpoint file {self.path / file} is unreadable: {error}") from None

    def document(self, file: str) -> dict[str, Any]:
        try:
            return json.loads((self.path / file).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint file {self.path / file} is unreadable: {error}") from None

    def has(self, file: str) -> bool:
        return file in self.files


class CheckpointStore:
    """The checkpoint folders of one run directory and the pointer that selects among them."""

    def __init__(self, run_path: Path) -> None:
        self.root = Path(run_path) / CHECKPOINTS_DIR

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER_FILE

    def exists(self) -> bool:
        """A pointer, or checkpoint folders that a lost pointer would have named."""
        return self.pointer_path.is_file() or (self.root.is_dir() and any(self.root.glob("learned-*")))

    def pointer(self) -> dict[str, str | None] | None:
        """{"resume": name, "task_end": name or None}, or None before the first checkpoint."""
        if not self.pointer_path.is_file():
            return None
        try:
            pointer = json.loads(self.pointer_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint pointer {self.pointer_path} is unreadable: {error}") from None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("resume"), str):
            raise CheckpointError(f"checkpoint pointer {self.pointer_path} does not name a checkpoint")
        return pointer

    # -- writing

    def write(
        self,
        name: str,
        tensors: dict[str, dict[str, torch.Tensor]],
        documents: dict[str, Any],
        task_end: bool,
    ) -> str:
        """Write a checkpoint folder, make it the resume point (and the task-end one if `task_end`),
        then delete folders nothing points at. Returns the folder name used."""
        pointer = self.pointer() or self.recovered_pointer()
        kept = {pointer.get("resume"), pointer.get("task_end")}
        final = self._free_name(name, kept)
        staging = self.root / f".tmp-{final}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            manifest: dict[str, dict[str, Any]] = {}
            for file, content in tensors.items():
                write_tensors(staging / file, content)
                kill_point(f"checkpoint/{final}/partial")
            for file, content in documents.items():
                write_json(staging / file, content)
            for file in [*tensors, *documents]:
                manifest[file] = {"sha256": sha256_file(staging / file), "bytes": (staging / file).stat().st_size}
            write_json(staging / MANIFEST_FILE, {"format": FORMAT_VERSION, "files": manifest})
            fsync_directory(staging)
            kill_point(f"checkpoint/{final}/written")
            if (self.root / final).exists():  # an unreferenced leftover of a crashed write
                shutil.rmtree(self.root / final)
            os.replace(staging, self.root / final)
            fsync_directory(self.root)
            kill_point(f"checkpoint/{final}/renamed")
            new_pointer = {"format": FORMAT_VERSION, "resume": final,
                           "task_end": final if task_end else pointer.get("task_end")}
            atomic_write_bytes(self.pointer_path, json_bytes(new_pointer))
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, CheckpointWriteError):
                raise
            raise write_error(Path(error.filename) if error.filename else staging, error) from None
        except BaseException:  # a kill point aside, nothing half-written stays behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        kill_point(f"checkpoint/{final}/switched")
        self.prune({new_pointer["resume"], new_pointer["task_end"]})
        return final

    def _free_name(self, name: str, kept: set[str | None]) -> str:
        candidate, counter = name, 1
        while candidate in kept:
            candidate, counter = f"{name}~{counter}", counter + 1
        return candidate

    def prune(self, keep: set[str | None]) -> None:
        """Delete every folder (including crashed writes' leftovers) that the pointer does not name."""
        try:
            for entry in self.root.iterdir():
                if entry.name == POINTER_FILE or entry.name in keep:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                elif entry.name.startswith("."):
                    entry.unlink(missing_ok=True)
        except OSError as error:  # the new checkpoint is committed; leftovers only cost disk space
            log.warning("could not delete old checkpoints in %s: %s", self.root, error)

    def remove_staging(self) -> None:
        """Delete staging folders that crashed or failed writes left behind (call with the run locked)."""
        if self.root.is_dir():
            for entry in self.root.glob(".tmp-*"):
                shutil.rmtree(entry, ignore_errors=True)

    # -- reading

    def open(self, which: str = "resume") -> Checkpoint | None:
        """The verified checkpoint the pointer names as `which` ("resume" or "task_end"), or None.

        Without a pointer (latest.json deleted), the newest checkpoint folder that verifies.
        """
        pointer = self.pointer()
        if pointer is None:
            return self.newest_complete(task_end=which == "task_end")
        if pointer.get(which) is None:
            return None
        return self.verify(str(pointer[which]))

    def recovered_pointer(self) -> dict[str, str | None]:
        """What a lost pointer named: the newest complete checkpoint, and the newest complete task-end one."""
        resume, task_end = self.newest_complete(), self.newest_complete(task_end=True)
        return {"resume": resume.name if resume else None, "task_end": task_end.name if task_end else None}

    def newest_complete(self, task_end: bool = False) -> Checkpoint | None:
        """The newest checkpoint folder whose files match its manifest (a task-end one if asked), or None."""
        if not self.root.is_dir():
            return None
        names = sorted((e.name for e in self.root.iterdir() if e.is_dir() and e.name.startswith("learned-")),
                       key=checkpoint_order, reverse=True)
        for name in names:
            if task_end and "-phase-" in name:
                continue
            try:
                checkpoint = self.verify(name)
            except CheckpointError as error:
                log.warning("skipping checkpoint %s: %s", self.root / name, error)
                continue
            log.warning("%s is missing; using the newest complete checkpoint, %s", self.pointer_path, name)
            return checkpoint
        return None

    def verify(self, name: str) -> Checkpoint:
        path = self.root / name
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CheckpointError(f"checkpoint {path} (named by {self.pointer_path}) is missing or has no {MANIFEST_FILE}")
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {error}") from None
        for file, entry in entries.items():
            file_path = path / file
            if not file_path.is_file():
                raise CheckpointError(f"checkpoint file {file_path} is missing (listed in {manifest_path})")
            size = file_path.stat().st_size
            if size != entry.get("bytes") or sha256_file(file_path) != entry.get("sha256"):
                raise CheckpointError(
                    f"checkpoint file {file_path} does not match its SHA-256 in {manifest_path} "
                    f"({size} bytes, {entry.get('bytes')} expected): it was truncated or modified after it was written"
                )
        if LEARNER_TENSORS not in entries or LEARNER_INFO not in entries:
            raise CheckpointError(f"checkpoint {path} lacks {LEARNER_TENSORS} or {LEARNER_INFO} in {manifest_path}")
        return Checkpoint(name, path, sorted(entries))


def checkpoint_order(name: str) -> tuple[int, int, int, int]:
    """Sort key of checkpoint names: learned-0003 < learned-0003-phase-0-epoch-0002 < learned-0004;
    a `~N` suffix (a rewrite of the same position) counts as newer."""
    base, _, rewrite = name.partition("~")
    parts = base.split("-")
    learned = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    phase = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else -1
    epoch = int(parts[5]) if len(parts) > 5 and parts[5].isdigit() else -1
    return learned, phase, epoch, int(rewrite) if rewrite.isdigit() else 0


# ---------------------------------------------------------------- RNG, optimiser, scheduler as JSON + tensors
