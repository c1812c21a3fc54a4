"""The run directory: resolved config, metrics, log and the learner's state after each task."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from carecl.config import ExperimentConfig, load_config, save_config
from carecl.errors import CareclError
from carecl.metrics import RunSummary, TaskEvaluation

CONFIG_FILE = "config.yaml"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
STATE_FILE = "learner.safetensors"
STATE_INFO = "learner.json"
LOG_FILE = "log.txt"


class RunDirectoryError(CareclError, ValueError):
    """A run directory is missing, incomplete, or holds a different run."""


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temporary file, fsync and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, config: ExperimentConfig) -> "RunDirectory":
        run = cls(path)
        if (run.path / CONFIG_FILE).exists() or (run.path / METRICS_JSON).exists():
            raise RunDirectoryError(f"output directory {run.path} already holds a run; choose another --output")
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.path / CONFIG_FILE)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        run = cls(path)
        for name in (CONFIG_FILE, STATE_FILE, STATE_INFO):
            if not (run.path / name).is_file():
                raise RunDirectoryError(f"{run.path / name} not found: not a finished carecl run directory")
        return run

    def config(self) -> ExperimentConfig:
        return load_config(self.path / CONFIG_FILE)

    def write_metrics(self, evaluations: list[TaskEvaluation], extra: dict[str, Any]) -> RunSummary:
        summary = RunSummary.from_evaluations(evaluations)
        document = {"summary": summary.__dict__, "tasks": [e.__dict__ for e in evaluations], **extra}
        atomic_write_bytes(self.path / METRICS_JSON, json.dumps(_json_safe(document), indent=2).encode())
        atomic_write_bytes(self.path / METRICS_CSV, metrics_csv(evaluations).encode())
        return summary

    def save_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        buffer = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        temporary = self.path / f".{STATE_FILE}.tmp"
        save_file(buffer, str(temporary))
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, self.path / STATE_FILE)
        atomic_write_bytes(self.path / STATE_INFO, json.dumps(_json_safe(info), indent=2).encode())

    def load_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        try:
            tensors = load_file(str(self.path / STATE_FILE))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise RunDirectoryError(f"{self.path / STATE_FILE} is unreadable: {error}") from None
        info = json.loads((self.path / STATE_INFO).read_text())
        return tensors, info

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.path / METRICS_JSON).read_text())


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


