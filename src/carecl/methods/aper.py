"""APER ("Revisiting Class-Incremental Learning with Pre-Trained Models", Zhou et al., IJCV 2024):
adapt a PEFT module in the first task only, then classify by cosine similarity to class means of
the concatenated [frozen ViT, adapted ViT] features. Four registered variants, by PEFT module:
`aper_adapter`, `aper_ssf`, `aper_vpt_shallow`, `aper_vpt_deep` (LAMDA-PILOT's models/aper_*.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from carecl.classifiers import PrototypeClassifier
from carecl.config import ExperimentConfig, require
from carecl.methods.base import register_method
from carecl.methods.feature_learner import FeatureLearner, FeatureLearnerConfig, FirstSessionConfig
from carecl.scenario import Scenario, Task


class APER(FeatureLearner):
    """Prototypes of [frozen CLS feature, adapted CLS feature] (2·C wide), cosine scores."""

    options: AperConfig

    fixed_class_scores = True  # features frozen after the first task, a prototype per class

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.prototypes = PrototypeClassifier(self.feature_dim)

    @property
    def feature_dim(self) -> int:
        return 2 * self.backbone.num_features

    def embed(self, images: Tensor) -> Tensor:
        with self.tuner.bypassed():
            frozen = self.backbone(images)
        return torch.cat([frozen, self.backbone(images)], dim=-1)

    def begin_task(self, task: Task) -> None:
        self.prototypes.grow(task.high)

    def fit_classes(self, features: Tensor, labels: Tensor, task: Task) -> None:
        self.prototypes.fit_classes(features, labels, range(task.low, task.high))

    def class_scores(self, features: Tensor) -> Tensor:
        return self.prototypes(features, self.n_seen_classes)

    def class_range_scores(self, features: Tensor, low: int, high: int) -> Tensor:
        return self.prototypes.forward_range(features, low, high)


@dataclass
class AperConfig(FeatureLearnerConfig):
    def validate(self) -> None:
        self.first_session.validate()
        require(self.first_session.tuner != "none", "first_session.tuner",
                "must be a PEFT module for APER (adapter, ssf, vpt_shallow, vpt_deep); for frozen features use simplecil")


@dataclass
class AperAdapterConfig(AperConfig):
    name: str = "aper_adapter"
    first_session: FirstSessionConfig = field(default_factory=lambda: FirstSessionConfig(tuner="adapter"))


@dataclass
class AperSSFConfig(AperConfig):
    name: str = "aper_ssf"
    first_session: FirstSessionConfig = field(default_factory=lambda: FirstSessionConfig(tuner="ssf"))


@dataclass
class AperVPTShallowConfig(AperConfig):
    name: str = "aper_vpt_shallow"
    first_session: FirstSessionConfig = field(default_factory=lambda: FirstSessionConfig(tuner="vpt_shallow"))


@dataclass
class AperVPTDeepConfig(AperConfig):
    name: str = "aper_vpt_deep"
    first_session: FirstSessionConfig = field(default_factory=lambda: FirstSessionConfig(tuner="vpt_deep"))


for _name, _options in (("aper_adapter", AperAdapterConfig), ("aper_ssf", AperSSFConfig),
                        ("aper_vpt_shallow", AperVPTShallowConfig), ("aper_vpt_deep", AperVPTDeepConfig)):
    register_method(_name, _options)(APER)
