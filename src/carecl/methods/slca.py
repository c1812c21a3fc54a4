"""SLCA ("SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained Model",
Zhang et al., ICCV 2023; LAMDA-PILOT's models/slca.py): the whole ViT is fine-tuned in every task, but
slowly (backbone lr = lr × `backbone_lr_scale`, 0.01), with a new linear head per task trained on the
task's classes (older heads frozen); MultiStepLR. After each task, Gaussian class statistics of the
tuned features; from the second task on, classifier alignment: every head retrained on 256 samples per
class drawn from the Gaussians (means shrunk by the decay), with the logits normalised by the mean
per-task logit norm and divided by `logit_norm` (0.1).

As in the code, the aligned heads are used for evaluation only: the next task starts again from the
heads as stage 1 left them (PILOT's `fc.backup()` / `fc.recall()`); here the aligned heads are a
second, saved copy.

The backbone is not frozen: it is part of the learner's saved state (`backbone_modules()` is empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.alignment_config import AlignmentConfig, slca_style_alignment
from carecl.classifiers import linear_head
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, ParameterGroup, Phase, StateHolder, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.statistics import ClassFeatureSums, GaussianClassStatistics


@dataclass
class SLCAConfig(MethodConfig):
    name: str = "slca"
    # The slow learner: the backbone's lr relative to the heads' (train.lr).
    backbone_lr_scale: float = 0.01
    # MultiStepLR epochs and factor for the task's training (PILOT: [18], 0.1 with 20 epochs).
    milestones: list[int] = field(default_factory=lambda: [18])
    lr_decay: float = 0.1
    # Classifier alignment; its scheduler_t_max should equal its epochs (PILOT: cosine over ca_epochs).
    alignment: AlignmentConfig = field(default_factory=slca_style_alignment)
    # Logits divided by their mean per-task L2 norm, then by this temperature, during alignment; 0 = off.
    logit_norm: float = 0.1

    def validate(self) -> None:
        require(self.backbone_lr_scale >= 0, "backbone_lr_scale", f"must be >= 0, got {self.backbone_lr_scale}")
        require(self.logit_norm >= 0, "logit_norm", f"must be >= 0, got {self.logit_norm}")
        require(all(m > 0 for m in self.milestones), "milestones", f"must be positive epochs, got {self.milestones}")


@register_method("slca", SLCAConfig)
class SLCA(Method):
    options: SLCAConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.backbone = backbone.requires_grad_(True)
        self.heads = nn.ModuleList()
        self.aligned = nn.ModuleList()
        self.statistics = GaussianClassStatistics()

    # ---- growth and training -----------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        reference = next(self.backbone.parameters())
        for head in self.heads:
            head.requires_grad_(False)
        self.heads.append(linear_head(self.backbone.num_features, task.size).to(reference.device))
        self.aligned.append(linear_head(self.backbone.num_features, task.size).to(reference.device).requires_grad_(False))

    def training_phases(self, task: Task) -> list[Phase]:
        train, options = self.experiment.train, self.options
        if train.epochs == 0:
            return []
        return [Phase.from_train("slow learner", train, milestones=tuple(options.milestones), lr_decay=options.lr_decay)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.heads[-1].parameters()]

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        return [ParameterGroup(list(self.backbone.parameters()), self.options.backbone_lr_scale, name="backbone"),
                ParameterGroup(list(self.heads[-1].parameters()), 1.0, name="head")]

    def logits(self, features: Tensor, heads: nn.ModuleList | None = None) -> Tensor:
        return torch.cat([head(features) for head in (heads if heads is not None else self.heads)], dim=1)

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        logits = self.logits(self.backbone(images))[:, task.low: task.high]
        loss = F.cross_entropy(logits, targets - task.low)
        return StepOutput(loss, {"loss": loss.item()})

    # ---- statistics and alignment --------------------------------------------------------
    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        self.eval()
        task = context.task
        sums = ClassFeatureSums(task.low, task.high, self.backbone.num_features, "covariance")
        for images, targets in context.statistics_loader():
            sums.add(self.backbone(images.to(context.device)).float(), targets)
        sums.reduce_(context.distributed)
        sums.store_into(self.statistics)
        self.aligned.load_state_dict(self.heads.state_dict())
        if task.index > 0:
            self.align(context)

    def align(self, context: TaskContext) -> None:
        self.align_head(self.aligned, self.statistics, self.options.alignment, context, "slca",
                        logits=lambda features: self.normalised_logits(self.logits(features, self.aligned)))

    def normalised_logits(self, logits: Tensor) -> Tensor:
        """Logits over the mean of each task's logit norm, over `logit_norm` (SLCA's decoupled logits)."""
        if not self.options.logit_norm:
            return logits
        sizes = [head.out_features for head in self.aligned]
        norms = torch.cat([part.norm(dim=-1, keepdim=True) + 1e-7 for part in logits.split(sizes, dim=1)], dim=1)
        return logits / norms.mean(dim=-1, keepdim=True) / self.options.logit_norm

    # ---- prediction and state ----------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        heads = self.aligned if self.n_learned_tasks > 1 else self.heads
        return self.logits(self.backbone(images), heads)[:, : self.n_seen_classes]

    def saved_states(self) -> dict[str, StateHolder]:
        return {"statistics": self.statistics}

