"""Which trial a tune chooses: the highest validation value; among the trials within `tune.tolerance` of it, the
one whose values lie nearest the config's own. best.yaml, the two-stream final run and the per-trial progress line
all ask here, so they cannot name different trials."""

from __future__ import annotations

import math
from typing import Any


def completed(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def best_trial(study, config: dict[str, Any] | None = None, tolerance: float = 0.0):
    """The trial of the highest value; among the trials within `tolerance` of it, the one whose values lie nearest
    the config's own (the published ones), on a log scale for positive numbers: a tie is no evidence for moving
    away from them. None while no trial has finished."""
    trials = [t for t in completed(study) if t.value is not None]
    if not trials:
        return None
    top = max(t.value for t in trials)
    tied = [t for t in trials if t.value >= top - tolerance]
    return min(tied, key=lambda t: (distance(t.params, config or {}), t.number))


def distance(values: dict[str, Any], config: dict[str, Any]) -> float:
    """How far a trial's values are from the config's: summed |log ratio| of numbers, 1 for any other difference."""
    total = 0.0
    for key, value in values.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(value, (int, float)) and isinstance(node, (int, float)) and value > 0 and node > 0:
            total += abs(math.log(value / node))
        elif value != node:
            total += 1.0
    return total
