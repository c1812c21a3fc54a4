"""ACIL ("ACIL: Analytic Class-Incremental Learning with Absolute Memorization and Privacy Protection",
Zhuang et al., NeurIPS 2022; authors' code ZHUANGHP/Analytic-continual-learning): frozen features
expanded by a fixed random buffer layer, X = ReLU(f Wᵀ) (8192 wide, no bias), and a linear head
learned by recursive least squares: after every task it equals the ridge solution (γ) on all data
seen so far, without keeping any of it.

Differences from the authors' code, written down: the buffer's weights come from a generator seeded
by the run's seed; the whole task is one RLS update (theirs: mini-batches, mathematically the same);
the backbone is the frozen pre-trained ViT (their base training of a ResNet on the first task is
`first_session.tuner` here, off by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.classifiers import AnalyticClassifier
from carecl.config import ExperimentConfig, require
from carecl.methods.base import register_method
from carecl.methods.feature_learner import FeatureLearner, FeatureLearnerConfig
from carecl.scenario import Scenario, Task

# RLS rows per Woodbury update: bounds the (rows x rows) system solved at once.
RLS_CHUNK = 4096


@dataclass
class ACILConfig(FeatureLearnerConfig):
    name: str = "acil"
    buffer_size: int = 8192
    # Ridge γ of the analytic head (the authors' default 0.1).
    gamma: float = 0.1

    def validate(self) -> None:
        self.first_session.validate()
        require(self.buffer_size > 0, "buffer_size", f"must be positive, got {self.buffer_size}")
        require(self.gamma > 0, "gamma", f"must be positive, got {self.gamma}")


@register_method("acil", ACILConfig)
class ACIL(FeatureLearner):
    options: ACILConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        buffer = torch.empty(self.options.buffer_size, backbone.num_features)
        generator = torch.Generator().manual_seed(config.seed)
        # nn.Linear's default (kaiming-uniform, a = √5) initialisation, as the authors' RandomBuffer.
        bound = 1.0 / math.sqrt(backbone.num_features)
        self.register_buffer("buffer", buffer.uniform_(-bound, bound, generator=generator))
        self.analytic = AnalyticClassifier(self.options.buffer_size, self.options.gamma)

    def expand(self, features: Tensor) -> Tensor:
        return F.relu(F.linear(features.to(self.buffer.dtype), self.buffer))

    def fit_classes(self, features: Tensor, labels: Tensor, task: Task) -> None:
        for start in range(0, len(labels), RLS_CHUNK):
            rows = slice(start, start + RLS_CHUNK)
            self.analytic.fit_task(self.expand(features[rows]), labels[rows], task.high)

    def class_scores(self, features: Tensor) -> Tensor:
        return self.analytic(self.expand(features), self.n_seen_classes)
