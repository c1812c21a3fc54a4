"""FeCAM ("FeCAM: Exploiting the Heterogeneity of Class Distributions in Exemplar-Free Continual
Learning", Goswami et al., NeurIPS 2023; authors' code dipamgoswami/FeCAM, its ViT scripts): frozen
ViT features, L2-normalised; per class a mean and a covariance shrunk by α₁·mean(diag) on the diagonal
and α₂·mean(off-diagonal) off it, normalised to a correlation matrix; prediction by the smallest
Mahalanobis distance (pseudo-inverse). `first_session.tuner` can adapt the ViT first, as LAMDA-PILOT's
port does (with α = 100 and no α₂, a variant not reproduced here).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from carecl.classifiers import MahalanobisClassifier
from carecl.config import ExperimentConfig, require
from carecl.methods.base import register_method
from carecl.methods.feature_learner import FeatureLearner, FeatureLearnerConfig
from carecl.scenario import Scenario, Task


@dataclass
class FeCAMConfig(FeatureLearnerConfig):
    name: str = "fecam"
    # Covariance shrinkage on the diagonal and off it (the authors' ViT scripts: 10 and 10).
    alpha1: float = 10.0
    alpha2: float = 10.0

    def validate(self) -> None:
        self.first_session.validate()
        require(self.alpha1 >= 0 and self.alpha2 >= 0, "alpha1", f"and alpha2 must be >= 0, got {self.alpha1}, {self.alpha2}")


@register_method("fecam", FeCAMConfig)
class FeCAM(FeatureLearner):
    options: FeCAMConfig

    fixed_class_scores = True  # frozen features, each class's mean and precision fixed once fitted

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.mahalanobis = MahalanobisClassifier(self.feature_dim, self.options.alpha1, self.options.alpha2)

    def begin_task(self, task: Task) -> None:
        self.mahalanobis.grow(task.high)

    def fit_classes(self, features: Tensor, labels: Tensor, task: Task) -> None:
        self.mahalanobis.fit_classes(features, labels, range(task.low, task.high))

    def class_scores(self, features: Tensor) -> Tensor:
        return self.mahalanobis(features, self.n_seen_classes)

    def class_range_scores(self, features: Tensor, low: int, high: int) -> Tensor:
        return self.mahalanobis.forward_range(features, low, high)
