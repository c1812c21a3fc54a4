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
from dataclasses import dataclass, field, replace
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
    """Which PEFT module the first task trains (none: the frozen ViT as it is), and each module's options."""

    tuner: Literal["none", "adapter", "ssf", "vpt_shallow", "vpt_deep"] = "none"
    # Parallel adapter (PILOT's `ffn_num` = bottleneck, output scale 0.1, dropout 0.1).
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # SSF: γ ~ N(1, init_std), β ~ N(0, init_std) at the start (PILOT: 0.02).
    ssf: SSFConfig = field(default_factory=lambda: SSFConfig(init_std=0.02))
    # VPT prompt tokens per block (PILOT's `prompt_token_num`), initialised to zeros as PILOT does; shallow or
    # deep is the tuner's name.
    vpt: VPTConfig = field(default_factory=lambda: VPTConfig(init="zeros"))

    def validate(self) -> None:
        require(self.vpt.n_prompts > 0, "vpt.n_prompts", f"must be positive, got {self.vpt.n_prompts}")
        require(not self.vpt.deep, "vpt.deep", "is set by the tuner's name: use tuner: vpt_deep")


@dataclass
class FeatureLearnerConfig(MethodConfig):
    """Options every frozen-feature method has."""

    first_session: FirstSessionConfig = field(default_factory=FirstSessionConfig)
    # Remember each image's features once they can no longer change.
    cache_features: bool = True

    moved_keys = {"first_session.adapter_bottleneck": "first_session.adapter.bottleneck",
                  "first_session.adapter_scale": "first_session.adapter.scale",
                  "first_session.ssf_init_std": "first_session.ssf.init_std",
                  "first_session.prompt_tokens": "first_session.vpt.n_prompts",
                  "first_session.prompt_init": "first_session.vpt.init"}


# `first_session.tuner` -> the injector that wraps the ViT for the first task.
FIRST_SESSION_TUNERS: dict[str, Callable[[nn.Module, FirstSessionConfig], Injector]] = {
    "adapter": lambda vit, options: ParallelAdapterInjector(vit, options.adapter),
    "ssf": lambda vit, options: SSFInjector(vit, options.ssf),
    "vpt_shallow": lambda vit, options: VPTInjector(vit, options.vpt),
    "vpt_deep": lambda vit, options: VPTInjector(vit, replace(options.vpt, deep=True)),
}


def build_first_session_tuner(vit: nn.Module, options: FirstSessionConfig) -> Injector | None:
    build = FIRST_SESSION_TUNERS.get(options.tuner)
    return build(vit, options) if build is not None else None


class FeatureLearner(Method):
    """Features → `fit_classes` after each task → `class_scores`; subclasses supply those two."""

    options: FeatureLearnerConfig

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
        return [Phase.from_train("first-session adaptation", train)]

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
