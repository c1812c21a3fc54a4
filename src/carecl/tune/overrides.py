"""Values set on a config mapping by dotted key (a trial's parameters), and a search's trial configs."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from carecl.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict


def with_values(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with each dotted key set to its value (`method.name` switches method as --set does)."""
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in values.items()]
    return apply_overrides(copy.deepcopy(config), overrides)


def trial_config(base: dict[str, Any], values: dict[str, Any], *, stream: list[str] = (), max_tasks: int | None = None
                 ) -> ExperimentConfig:
    """A trial's config: `base` on the tuning stream (`stream` overrides), with the validation split evaluated
    instead of the test set, the trial's `values`, and at most `max_tasks` tasks learned."""
    config = apply_overrides(copy.deepcopy(base), list(stream))
    tune = config_from_dict(config).tune
    data = config.setdefault("data", {})
    if data.get("validation_fraction") is None:
        data["validation_fraction"] = tune.validation_fraction
    config.setdefault("eval", {})["test_set"] = False
    config.setdefault("train", {})["progress"] = False
    if max_tasks is not None:
        config["train"]["max_tasks"] = max_tasks
    try:
        return config_from_dict(with_values(config, values))
    except ConfigError as error:
        raise ConfigError(f"a trial's config: {error}") from None


def chosen_config(base: dict[str, Any], values: dict[str, Any]) -> ExperimentConfig:
    """The evaluation stream's config with the chosen values: what best.yaml holds and `carecl train` re-runs."""
    return config_from_dict(with_values(base, values))


def as_mapping(config: ExperimentConfig) -> dict[str, Any]:
    return config_to_dict(config)
