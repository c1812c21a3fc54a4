"""Continual learners, registered by name."""

from __future__ import annotations

from torch import nn

from carecl.config import ExperimentConfig
from carecl.methods import care, care_config, simplecil  # noqa: F401  (registration side effects)
from carecl.methods.base import METHODS, Method
from carecl.scenario import Scenario


def build_method(config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> Method:
    return METHODS.get(config.method.name)(config, backbone, scenario)
