"""Linear probe: multinomial logistic regression on frozen features, fitted to convergence.

Not a continual learner: each task's fit sees only that task's images, so in a class-incremental
run it forgets everything before. Run it as ONE task holding every class (`data.init_cls` = the
number of classes) to get the joint upper bound that incremental methods are measured against.

Objective (scikit-learn's LogisticRegression, lbfgs, multinomial): C · Σ_i CE(W f_i + b, y_i) + ½‖W‖²,
solved in float64 with L-BFGS on the cached frozen features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.feature_cache import FeatureCache
from carecl.methods.base import Method, Phase, TaskContext, register_method
from carecl.scenario import Scenario, Task


@dataclass
class LinearProbeConfig(MethodConfig):
    name: str = "linear_probe"
    # Inverse L2 strength, as scikit-learn's C.
    C: float = 1.0
    max_iterations: int = 500

    def validate(self) -> None:
        require(self.C > 0, "C", f"must be positive, got {self.C}")
        require(self.max_iterations > 0, "max_iterations", f"must be positive, got {self.max_iterations}")


@register_method("linear_probe", LinearProbeConfig)
class LinearProbe(Method):
    options: LinearProbeConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.backbone = backbone
        self.register_buffer("weight", torch.zeros(0, backbone.num_features))
        self.register_buffer("bias", torch.zeros(0))
        self.cache = FeatureCache(self.backbone)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def begin_task(self, task: Task) -> None:
        self.weight = torch.zeros(task.high, self.weight.shape[1], device=self.weight.device)
        self.bias = torch.zeros(task.high, device=self.bias.device)

    def training_phases(self, task: Task) -> list[Phase]:
        return []

    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        self.eval()
        features, targets = [], []
        for images, labels in context.statistics_loader():
            features.append(self.cache(images.to(context.device)).double())
            targets.append(labels.to(context.device))
        if context.distributed.enabled:
            raise NotImplementedError("linear_probe runs in a single process")
        weight, bias = fit_logistic_regression(torch.cat(features), torch.cat(targets), context.task.high,
                                               self.options.C, self.options.max_iterations)
        self.weight, self.bias = weight.to(self.weight.dtype), bias.to(self.bias.dtype)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n_seen = self.n_seen_classes
        return F.linear(self.cache(images).to(self.weight.dtype), self.weight[:n_seen], self.bias[:n_seen])


def fit_logistic_regression(features: torch.Tensor, targets: torch.Tensor, n_classes: int, C: float,
                            max_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{W,b} C · Σ CE(W x + b, y) + ½‖W‖² (no penalty on b), by L-BFGS in float64."""
    weight = torch.zeros(n_classes, features.shape[1], dtype=torch.float64, device=features.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, tolerance_grad=1e-8,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = C * F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum") + 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()
