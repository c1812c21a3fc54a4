"""Seed groups (`seed: [1993, 1994, 1995]`, or `carecl train --seeds`): one ordinary run per seed under a group
directory, run one after the other; `group.json` holds the mean ± std over the finished seeds (runs/group.py).
A group resumes seed by seed: finished runs are read back, an interrupted one is resumed, missing ones start."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from carecl.config import ConfigError, ExperimentConfig, load_config, save_config
from carecl.engine.run import resume_experiment, run_experiment
from carecl.metrics import RunSummary
from carecl.runs.directory import CONFIG_FILE, RunDirectory
from carecl.runs.group import read_group, seed_run_name, write_group

log = logging.getLogger("carecl")


def group_seeds(config: ExperimentConfig) -> list[int] | None:
    """The seeds of a group config (a list), or None for a single run."""
    return list(config.seed) if isinstance(config.seed, list) else None


def run_group(config: ExperimentConfig, output: str | Path) -> dict[int, RunSummary]:
    """One run per seed of `config.seed` under `output`; returns each seed's summary."""
    seeds = group_seeds(config)
    if seeds is None:
        raise ConfigError("seed: a run group needs a list of seeds")
    group = Path(output)
    RunDirectory.check_available(group)
    group.mkdir(parents=True, exist_ok=True)
    save_config(config, group / CONFIG_FILE)
    write_group(group, seeds, {})
    return continue_group(group, config, seeds, {})


def resume_group(output: str | Path, overrides: Sequence[str] = ()) -> dict[int, RunSummary]:
    """Finish a group: read the finished seeds back, resume the interrupted one, start the missing ones."""
    group = Path(output)
    seeds = read_group(group)["seeds"]
    config = load_config(group / CONFIG_FILE, overrides)
    return continue_group(group, config, seeds, {}, resume_overrides=overrides)


def continue_group(group: Path, config: ExperimentConfig, seeds: list[int], summaries: dict[int, RunSummary],
                   resume_overrides: Sequence[str] | None = None) -> dict[int, RunSummary]:
    for index, seed in enumerate(seeds):
        run_dir = group / seed_run_name(seed)
        log.info("seed %d (%d of %d): %s", seed, index + 1, len(seeds), run_dir)
        if resume_overrides is not None and RunDirectory.holds_run(run_dir):
            summaries[seed] = resume_experiment(run_dir, None, resume_overrides)
        else:
            summaries[seed] = run_experiment(dataclasses.replace(config, seed=seed), run_dir)
        write_group(group, seeds, {s: dataclasses.asdict(summary) for s, summary in summaries.items()})
    return summaries
