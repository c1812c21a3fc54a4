"""SSIAT ("Semantically-Shifted Incremental Adapter-Tuning is A Continual ViTransformer", Tan et al.,
CVPR 2024; code HAIV-Lab/SSIAT): one set of parallel adapters, shared by all tasks and tuned again in
every task without constraints, with a cosine head per task trained by CosFace (CE of s·(cos − m) over
the task's classes). Old classes live on as Gaussians (mean, covariance + 1e-3·I). Each task moves the
stored means by the semantic shift its training caused, estimated from the current task's images:
shift_c = Σ_i w_ci (after_i − before_i) / Σ_i w_ci, w_ci = exp(−‖before_i − μ_c‖² / 2σ²) + 1e-5. Then every
head is retrained on features sampled from the Gaussians (classifier alignment, SLCA's decay of older
means), and the aligned heads are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.alignment_config import AlignmentConfig, slca_style_alignment
from carecl.classifiers import CosineClassifier
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, Phase, StateHolder, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.statistics import ClassFeatureSums, GaussianClassStatistics
from carecl.tuners.adapter import FLAT_ADAPTER_KEYS, AdapterConfig, ParallelAdapterInjector

BEFORE_KEY = "features_before"


@dataclass
class SSIATConfig(MethodConfig):
    name: str = "ssiat"
    # The shared adapters (the authors' `ffn_num`, scale 0.1, no LayerNorm, dropout 0.1).
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # Epochs of every task after the first (`inc_epochs`); the first trains `train.epochs` (`init_epochs`).
    later_epochs: int = 10
    # CosFace scale s (`scale`, also the alignment's logit scale) and margin m (`margin`).
    scale: float = 20.0
    margin: float = 0.0
    # Move old class means by the estimated semantic shift (`ssca`), Gaussian kernel width σ (4.0 in the code).
    shift_compensation: bool = True
    shift_sigma: float = 4.0
    # Added to each class covariance (1e-3 in the authors' `_compute_class_mean`).
    covariance_ridge: float = 1e-3
    # Classifier alignment (`ca`, `ca_epochs`; their `_stage2_compact_classifier` is SLCA's); epochs 0 turns it off.
    alignment: AlignmentConfig = field(default_factory=slca_style_alignment)

    moved_keys = FLAT_ADAPTER_KEYS

    def validate(self) -> None:
        require(self.later_epochs >= 0, "later_epochs", f"must be >= 0, got {self.later_epochs}")
        require(self.scale > 0, "scale", f"must be positive, got {self.scale}")
        require(self.shift_sigma > 0, "shift_sigma", f"must be positive, got {self.shift_sigma}")
        require(self.covariance_ridge >= 0, "covariance_ridge", f"must be >= 0, got {self.covariance_ridge}")
        self.alignment.validate()


def semantic_shift(before: Tensor, after: Tensor, means: Tensor, sigma: float) -> Tensor:
    """(classes, C): each class's kernel-weighted mean of the samples' feature displacement."""
    before, after, means = before.double(), after.double(), means.double()
    weights = torch.exp(-torch.cdist(means, before).square() / (2 * sigma ** 2)) + 1e-5
    weights = weights / weights.sum(dim=1, keepdim=True)
    return weights @ (after - before)


@register_method("ssiat", SSIATConfig)
class SSIAT(Method):
    options: SSIATConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options = self.options
        self.backbone = backbone
        self.tuner = ParallelAdapterInjector(backbone, options.adapter)
        self.classifier = CosineClassifier(backbone.num_features)
        self.statistics = GaussianClassStatistics(ridge=options.covariance_ridge)
        # The current task's training features before its training (for the shift); empty between tasks.
        self.register_buffer(BEFORE_KEY, torch.zeros(0, backbone.num_features))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # ---- training ----------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        for head in self.classifier.heads:
            head.requires_grad_(False)  # the authors' old heads get no loss gradient: freezing them is the same
        self.classifier.add_block(task.size)

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        epochs = train.epochs if task.index == 0 else self.options.later_epochs
        return [Phase.from_train("adapter", train, epochs=epochs)] if epochs > 0 else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.tuner.parameters(), self.classifier.heads[-1]]

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        cosines = self.classifier(self.backbone(images))[:, task.low: task.high]
        local = targets - task.low
        margin = self.options.margin * F.one_hot(local, task.size).to(cosines.dtype)
        loss = F.cross_entropy(self.options.scale * (cosines - margin), local)
        return StepOutput(loss, {"loss": loss.item()})

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        if context.task.index > 0 and self.options.shift_compensation:
            self.eval()
            self.features_before = context.embed_task_images(self.backbone, "ssiat estimates the semantic shift")[0]

    # ---- statistics, shift and alignment -------------------------------------------------
    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        task = context.task
        self.eval()
        features, labels = context.embed_task_images(self.backbone, "ssiat estimates the semantic shift")
        if task.index > 0 and self.options.shift_compensation and len(self.features_before):
            old = list(range(task.low))
            means = torch.stack([self.statistics.mean(c) for c in old]).to(features.device)
            shift = semantic_shift(self.features_before, features, means, self.options.shift_sigma)
            self.statistics.shift_means(old, shift)
        self.features_before = self.features_before.new_zeros(0, features.shape[1])
        sums = ClassFeatureSums(task.low, task.high, features.shape[1])
        sums.add(features, labels)
        sums.store_into(self.statistics)
        if task.index > 0:
            self.align_head(self.classifier, self.statistics, self.options.alignment, context, "ssiat",
                            scale=self.options.scale)

    # ---- prediction and state ----------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.classifier(self.backbone(images))[:, : self.n_seen_classes]

    @torch.no_grad()
    def class_probabilities(self, images: Tensor) -> Tensor:
        return (self.options.scale * self.predict(images)).float().softmax(dim=1)

    def saved_states(self) -> dict[str, StateHolder]:
        return {"statistics": self.statistics}

    def load_state_tensors(self, tensors: dict[str, Tensor], grow: bool = False) -> None:
        if BEFORE_KEY in tensors:  # its length is the task's image count, unknown until loaded
            self.features_before = tensors[BEFORE_KEY].to(self.features_before).clone()
        super().load_state_tensors(tensors, grow)
