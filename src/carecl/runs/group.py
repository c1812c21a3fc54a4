"""Seed groups: one run directory per seed under a group directory, and a summary over the finished ones.

    GROUP/group.json        {"seeds": [...], "runs": {"1993": "seed-1993", ...}, "summary": {...}}
    GROUP/config.yaml       the config with its list of seeds
    GROUP/seed-1993/        an ordinary run directory (its config.yaml has `seed: 1993`)

`group.json` is rewritten (atomically) after every seed's run, so an interrupted group keeps what finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carecl.runs.files import atomic_write_bytes, json_bytes
from carecl.runs.directory import RunDirectoryError

GROUP_FILE = "group.json"
# Summary numbers a group reports as mean ± std over its finished seeds (RunSummary attribute names).
GROUP_METRICS = ("a_last", "average_accuracy", "forgetting", "transfer", "task_average", "last_task_average")


def seed_run_name(seed: int) -> str:
    return f"seed-{seed}"


def is_group(path: str | Path) -> bool:
    return (Path(path) / GROUP_FILE).is_file()


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "MeanStd":
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(float("nan"), float("nan"), 0)
        # The sample standard deviation (ddof 1), as papers' "± std over seeds"; 0 for a single seed.
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
        return cls(float(np.mean(finite)), std, len(finite))

    def format(self, spec: str = ".2f") -> str:
        """mean ± std; a single value alone; n/a without any."""
        if self.n == 0:
            return "n/a"
        return f"{self.mean:{spec}}" if self.n == 1 else f"{self.mean:{spec}} ± {self.std:{spec}}"


def summarise(summaries: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean ± std of each GROUP_METRICS value over the given seeds' summaries."""
    out = {}
    for key in GROUP_METRICS:
        stats = MeanStd.of([summary.get(key) for summary in summaries.values()])
        out[key] = {"mean": stats.mean, "std": stats.std, "n": stats.n}
    return out


def write_group(group: Path, seeds: list[int], summaries: dict[int, dict[str, Any]]) -> None:
    document = {"seeds": seeds, "runs": {str(seed): seed_run_name(seed) for seed in seeds},
                "finished": sorted(summaries), "summary": summarise(summaries),
                "per_seed": {str(seed): summaries[seed] for seed in sorted(summaries)}}
    atomic_write_bytes(group / GROUP_FILE, json_bytes(document))  # NaN as null: valid JSON for any parser


def read_group(group: str | Path) -> dict[str, Any]:
    path = Path(group) / GROUP_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"{path} is unreadable: {error}") from None
    seeds = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(seeds, list) or not all(type(seed) is int for seed in seeds):
        raise RunDirectoryError(f"{path}: expected `seeds`, a list of integers")
    return document


def group_run_dirs(group: str | Path) -> list[Path]:
    """The seed runs of a group that exist on disk, in the group's seed order."""
    group = Path(group)
    return [group / seed_run_name(seed) for seed in read_group(group)["seeds"] if (group / seed_run_name(seed)).is_dir()]
