"""RanPAC ("RanPAC: Random Projections and Pre-trained Models for Continual Learning", McDonnell et al.,
NeurIPS 2023; authors' code RanPAC/RanPAC): first-session PEFT adaptation, then features projected by
a fixed random matrix and a ReLU, h = ReLU(f W_rand) (M wide), and a ridge-regression classifier on
the Gram matrix Σhhᵀ and Σhyᵀ accumulated over tasks, λ chosen per task on a held-out 20 % split.

Differences from the authors' code, written down: the Gram and correlation matrices are float64 (the
authors': float32); W_rand comes from a generator seeded by the run's seed (theirs: the global RNG);
scores are h·Woᵀ without the first-session head's σ (a positive scale: the ranking is the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.classifiers import RidgeClassifier
from carecl.config import ExperimentConfig, require
from carecl.methods.base import register_method
from carecl.methods.feature_learner import FeatureLearner, FeatureLearnerConfig, FirstSessionConfig
from carecl.scenario import Scenario, Task


@dataclass
class RanPACConfig(FeatureLearnerConfig):
    name: str = "ranpac"
    first_session: FirstSessionConfig = field(default_factory=lambda: FirstSessionConfig(tuner="adapter"))
    # Width of the random projection (the paper's M); 0 = no projection, ridge on the features themselves.
    projection_dim: int = 10000

    def validate(self) -> None:
        self.first_session.validate()
        require(self.projection_dim >= 0, "projection_dim", f"must be >= 0, got {self.projection_dim}")


@register_method("ranpac", RanPACConfig)
class RanPAC(FeatureLearner):
    options: RanPACConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        width, projected = backbone.num_features, self.options.projection_dim
        generator = torch.Generator().manual_seed(config.seed)
        self.register_buffer("projection", torch.randn(width, projected, generator=generator) if projected else
                             torch.zeros(width, 0))
        self.ridge = RidgeClassifier(projected or width, scenario.n_classes)

    def project(self, features: Tensor) -> Tensor:
        """h = ReLU(f · W_rand), or f itself without a projection."""
        if self.projection.shape[1] == 0:
            return features
        return F.relu(features.to(self.projection.dtype) @ self.projection)

    def fit_classes(self, features: Tensor, labels: Tensor, task: Task) -> None:
        self.ridge.fit_task(self.project(features), labels)

    def class_scores(self, features: Tensor) -> Tensor:
        return self.ridge(self.project(features), self.n_seen_classes)
