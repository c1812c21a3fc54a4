"""SimpleCIL: a prototype classifier on frozen features (Zhou et al., "Revisiting CIL with PTMs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carecl.config import ExperimentConfig, MethodConfig
from carecl.feature_cache import FeatureCache
from carecl.methods.base import Method, Phase, TaskContext, register_method
from carecl.scenario import Scenario, Task


@dataclass
class SimpleCILConfig(MethodConfig):
    name: str = "simplecil"
    # Remember each image's frozen features (test images recur after every task).
    cache_features: bool = True


@register_method("simplecil", SimpleCILConfig)
class SimpleCIL(Method):
    """Each class is the mean of its training features; predict by cosine similarity."""

    options: SimpleCILConfig

    fixed_class_scores = True  # frozen features, a prototype fixed once its class is learned

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.backbone = backbone
        self.register_buffer("prototypes", torch.zeros(0, backbone.num_features))
        self.cache = FeatureCache(self.backbone) if self.options.cache_features else None

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.cache(images) if self.cache is not None else self.backbone(images)

    def begin_task(self, task: Task) -> None:
        grown = torch.zeros(task.high, self.prototypes.shape[1], device=self.prototypes.device)
        grown[: self.prototypes.shape[0]] = self.prototypes
        self.prototypes = grown

    def training_phases(self, task: Task) -> list[Phase]:
        return []

    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        self.eval()
        task = context.task
        sums = torch.zeros(task.size, self.prototypes.shape[1], device=context.device)
        counts = torch.zeros(task.size, device=context.device)
        for images, targets in context.statistics_loader():
            features = self.features(images.to(context.device))
            local = targets.to(context.device) - task.low
            sums.index_add_(0, local, features)
            counts.index_add_(0, local, torch.ones_like(local, dtype=counts.dtype))
        context.distributed.all_reduce_sum_(sums)  # each rank saw its own shard
        context.distributed.all_reduce_sum_(counts)
        self.prototypes[task.low : task.high] = sums / counts.clamp_min(1).unsqueeze(1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores_from_features(self.features(images), 0, self.n_seen_classes)

    @torch.no_grad()
    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    @torch.no_grad()
    def scores_from_features(self, features: torch.Tensor, low: int, high: int) -> torch.Tensor:
        return F.normalize(features, dim=-1) @ F.normalize(self.prototypes[low:high], dim=-1).T
