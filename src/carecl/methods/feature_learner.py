"""What the frozen-feature family shares (SimpleCIL-like prototypes, APER, RanPAC, FeCAM, ACIL):
features of a frozen ViT, optionally adapted once in the first task with a PEFT module, then a
closed-form or prototype classifier grown class by class. No registration here: each method's own
file registers it.

First-session adaptation (APER / RanPAC, as LAMDA-PILOT implements it): in task 0 only, the chosen
injector (parallel adapter, SSF, VPT shallow or deep) and a σ·cosine head are trained with
cross-entropy for `train.epochs` epochs (SGD, cosine schedule, `train.*`); afterwards everything is
frozen and the features never change again, so they are cached per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.classifiers import ScaledCosineHead
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.feature_cache import FeatureCache
from carecl.methods.base import Method, ParameterGroup, Phase, StepOutput, TaskContext
from carecl.scenario import Scenario, Task
from carecl.tuners.adapter import AdapterConfig, ParallelAdapterInjector
from carecl.tuners.base import Injector
from carecl.tuners.ssf import SSFConfig, SSFInjector
from carecl.tuners.vpt import VPTConfig, VPTInjector


@dataclass
class FirstSessionConfig:
    """Which PEFT module the first task trains (none: the frozen ViT as it is)."""

    tuner: Literal["none", "adapter", "ssf", "vpt_shallow", "vpt_deep"] = "none"
    # Parallel adapter bottleneck (PILOT's `ffn_num`) and output scale.
    adapter_bottleneck: int = 64
    adapter_scale: float = 0.1
    # SSF: γ ~ N(1, std), β ~ N(0, std) at the start (PILOT: 0.02).
    ssf_init_std: float = 0.02
    # VPT prompt tokens per block (PILOT's `prompt_token_num`), initialised to zeros as PILOT does.
    prompt_tokens: int = 5
    prompt_init: Literal["zeros", "uniform"] = "zeros"

    def validate(self) -> None:
        require(self.adapter_bottleneck > 0, "adapter_bottleneck", f"must be positive, got {self.adapter_bottleneck}")
        require(self.prompt_tokens > 0, "prompt_tokens", f"must be positive, got {self.prompt_tokens}")
        require(self.ssf_init_std >= 0, "ssf_init_std", f"must be >= 0, got {self.ssf_init_std}")


@dataclass
class FeatureLearnerConfig(MethodConfig):
    """Options every frozen-feature method has."""

    first_session: FirstSessionConfig = field(default_factory=FirstSessionConfig)
    # Remember each image's features once they can no longer change.
    cache_features: bool = True


# `first_session.tuner` -> the injector that wraps the ViT for the first task.
FIRST_SESSION_TUNERS: dict[str, Callable[[nn.Module, FirstSessionConfig], Injector]] = {
    "adapter": lambda vit, options: ParallelAdapterInjector(vit, AdapterConfig(
        bottleneck=options.adapter_bottleneck, scale=options.adapter_scale, layer_norm=False, dropout=0.1)),
    "ssf": lambda vit, options: SSFInjector(vit, SSFConfig(init_std=options.ssf_init_std)),
    "vpt_shallow": lambda vit, options: VPTInjector(vit, VPTConfig(
        n_prompts=options.prompt_tokens, deep=False, init=options.prompt_init)),
    "vpt_deep": lambda vit, options: VPTInjector(vit, VPTConfig(
        n_prompts=options.prompt_tokens, deep=True, init=options.prompt_init)),
}


def build_first_session_tuner(vit: nn.Module, options: FirstSessionConfig) -> Injector | None:
    build = FIRST_SESSION_TUNERS.get(options.tuner)
    return build(vit, options) if build is not None else None


class FeatureLearner(Method):
    """Features → `fit_classes` after each task → `class_scores`; subclasses supply those two."""

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.backbone = backbone
        self.tuner = build_first_session_tuner(backbone, self.options.first_session)
        self.first_head = (ScaledCosineHead(backbone.num_features, scenario.sizes[0])
                           if self.tuner is not None else None)
        self.cache = FeatureCache(self.embed) if self.options.cache_features else None

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    @property
    def feature_dim(self) -> int:
        return self.backbone.num_features

    # ---- features ----------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """The features classified: the (adapted) ViT's final-norm CLS token. APER overrides it."""
        return self.backbone(images)

    def features(self, images: Tensor) -> Tensor:
        return self.cache(images) if self.cache is not None else self.embed(images)

    # ---- first-session adaptation -----------------------------------------------------------
    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        if task.index > 0 or self.tuner is None or train.epochs == 0:
            return []
        return [Phase("first-session adaptation", train.epochs, train.lr, train.min_lr, train.epochs)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.tuner is None or self.n_learned_tasks > 0:
            return []
        return [p for module in (self.tuner, self.first_head) for p in module.parameters() if p.requires_grad]

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        return [ParameterGroup(self.trainable_parameters())]

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        loss = F.cross_entropy(self.first_head(self.backbone(images)), targets - task.low)
        return StepOutput(loss, {"loss": loss.item()})

    def end_task(self, context: TaskContext) -> None:
        if self.tuner is not None and context.task.index == 0:
            self.tuner.requires_grad_(False)
            self.first_head.requires_grad_(False)
        features, labels = self.task_features(context)
        self.fit_classes(features, labels, context.task)

    def task_features(self, context: TaskContext) -> tuple[Tensor, Tensor]:
        """Features and class positions of the task's training images (test transforms)."""
        self.eval()
        return context.embed_task_images(self.features, f"{self.options.name} fits its classifier")

    # ---- what each method supplies ----------------------------------------------------------------
    def fit_classes(self, features: Tensor, labels: Tensor, task: Task) -> None:
        raise NotImplementedError

    def class_scores(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.class_scores(self.features(images))[:, : self.n_seen_classes].float()

    @torch.no_grad()
    def eval_features(self, images: Tensor) -> Tensor:
        return self.features(images)

    @torch.no_grad()
    def scores_from_features(self, features: Tensor, low: int, high: int) -> Tensor:
        return self.class_range_scores(features, low, high).float()

    def class_range_scores(self, features: Tensor, low: int, high: int) -> Tensor:
        """Scores of classes [low, high) (subclasses with fixed class scores compute only those)."""
        return self.class_scores(features)[:, low:high]
