"""A search space read from YAML: dotted config keys mapped to a list of choices or a range.

    train.lr: [0.001, 0.003, 0.01, 0.03]                 # choices
    method.sema.threshold: {low: 0.5, high: 4.0}         # a float range
    train.lr: {low: 1.0e-4, high: 0.1, log: true}        # sampled on a log scale
    method.alignment.epochs: {low: 5, high: 30, step: 5} # integers (low, high and step integers)

Every key must be a config key (checked by building the config with each bound and each choice), so a typo
or a value the config refuses is an error naming SPACE.yaml and the key before any trial runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carecl.config import ConfigError, ConfigLoader, config_from_dict
from carecl.tune.overrides import with_values

RANGE_KEYS = {"low", "high", "log", "step"}
# A chosen value this close to a range's bound (as a fraction of its width) counts as at the end of the range.
EDGE = 0.05


@dataclass(frozen=True)
class Parameter:
    key: str
    choices: tuple[Any, ...] | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high, self.step) if v is not None)

    def values_to_check(self) -> list[Any]:
        """The values whose config must build: every choice, or both bounds."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def end_reached(self, value: Any) -> str | None:
        """Which end of this numeric parameter's space `value` is, "low" or "high" (the lowest or highest of three or
        more choices, or within EDGE of a range's bound; log ranges measured on the log scale); None inside it."""
        if self.choices is not None:
            numbers = sorted({c for c in self.choices if is_number(c)})
            if len(numbers) < 3 or len(numbers) != len(self.choices) or not is_number(value):
                return None
            return "low" if value == numbers[0] else "high" if value == numbers[-1] else None
        scale = math.log if self.log else float
        position = (scale(value) - scale(self.low)) / (scale(self.high) - scale(self.low))
        return "low" if position <= EDGE else "high" if position >= 1 - EDGE else None

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    source: str = "the search space"

    @classmethod
    def read(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        try:
            document = yaml.load(path.read_text(), Loader=ConfigLoader)
        except OSError as error:
            raise ConfigError(f"cannot read the search space {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        return cls.from_mapping(document, str(path))

    @classmethod
    def from_mapping(cls, document: Any, source: str) -> "SearchSpace":
        if not isinstance(document, dict) or not document:
            raise ConfigError(f"{source}: a search space maps dotted config keys to choices or ranges, "
                              "e.g. `train.lr: [0.001, 0.01]`")
        return cls(tuple(parameter(key, value, source) for key, value in document.items()), source)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def grid(self) -> dict[str, list[Any]]:
        """Optuna's GridSampler space: every parameter must be a list of choices."""
        ranges = [p.key for p in self.parameters if p.choices is None]
        if ranges:
            raise ConfigError(f"{self.source}: the grid sampler needs a list of choices for every key; "
                              f"{', '.join(ranges)} {'is a range' if len(ranges) == 1 else 'are ranges'}")
        return {p.key: list(p.choices) for p in self.parameters}

    def grid_size(self) -> int:
        """How many combinations the grid sampler has (an error naming the ranges, as grid(), if some key is one)."""
        return math.prod(len(values) for values in self.grid().values())

    def ends_reached(self, params: dict[str, Any]) -> list[str]:
        """For each chosen value at the end of its space: `key = value is the lowest/highest ...` (values beyond it
        were never tried, so the best one may lie there)."""
        said = []
        for p in self.parameters:
            end = p.end_reached(params[p.key]) if p.key in params else None
            if end is not None:
                where = (f"the {end}est of its choices" if p.choices else f"at the {end} end of its range")
                said.append(f"{p.key} = {format_value(params[p.key])} is {where}")
        return said

    def sampler_for(self, trials: int) -> str:
        """tune.sampler `auto`: every combination once when they all fit in the budget (TPE would draw the same
        choices again and again), else TPE."""
        if any(p.choices is None for p in self.parameters):
            return "tpe"
        return "grid" if self.grid_size() <= trials else "tpe"

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.parameters}

    def check_against(self, config: dict[str, Any]) -> None:
        """Build `config` with each choice and bound of every parameter: a key or value the config refuses is an
        error naming the space file and the key."""
        for p in self.parameters:
            for value in p.values_to_check():
                try:
                    config_from_dict(with_values(config, {p.key: value}))
                except ConfigError as error:
                    raise ConfigError(f"{self.source}: {p.key} = {value!r}: {error}") from None


def parameter(key: Any, value: Any, source: str) -> Parameter:
    where = f"{source}: {key}"
    if not isinstance(key, str) or "." not in key and key != "seed":
        raise ConfigError(f"{where}: keys are dotted config keys such as train.lr")
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: the list of choices is empty")
        return Parameter(key, choices=tuple(value))
    if not isinstance(value, dict) or not {"low", "high"} <= set(value) or set(value) - RANGE_KEYS:
        raise ConfigError(f"{where}: give a list of choices or a range {{low: ..., high: ...[, log: true][, step: ...]}}, "
                          f"got {value!r}")
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or not isinstance(log, bool):
        raise ConfigError(f"{where}: low, high and step are numbers and log is true/false, got {value!r}")
    if not low < high:
        raise ConfigError(f"{where}: low must be below high, got {low} and {high}")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{where}: a log range needs low > 0 and no step")
    return Parameter(key, low=low, high=high, log=log, step=step)
