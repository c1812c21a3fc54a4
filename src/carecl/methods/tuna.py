"""TUNA ("Integrating Task-Specific and Universal Adapters for Pre-Trained Model-based Class-Incremental Learning",
Wang, Zhou and Ye, ICCV 2025; the authors' code up to commit 77d4f10, kept in the fork Ngahoang2005/ICCV2025-TUNA:
`models/tuna.py`, `backbone/vit_tuna.py`).

One set of parallel adapters (AdaptFormer, bottleneck 16, scale 0.1) is trained on every task and never reset;
a copy of it is kept at the end of each task: task t's task-specific adapters. (Their orthogonality penalty
also reaches the finished copies' up projections, which their optimiser holds, so those keep moving under the
penalty and weight decay while later tasks train: `penalty_trains_finished_sets`, on as in their code.) The head is a cosine classifier
with a block of classes per task; a task trains the adapters and every head by CosFace on the task's classes
(s · (cos − m)), plus, from the second task on, an orthogonality penalty between the working adapters' up
projections and every earlier task's: reg · e^-(t+1) · Σ_i Σ_L |mean(n(U_L) n(U_{i,L})ᵀ)| / depth (rows normalised).
After the task: the universal adapters, EMR-merging's unified vector of all task-specific sets (per weight: the
sign of the mean over tasks, and the largest magnitude among the tasks that agree with it); Gaussian class
statistics through the working adapters (covariance + 1e-4·I); from the second task on, the head is aligned on
features sampled from them (CE of s · cos; the CaRE release's decay of older means when `alignment.decay`).

Inference: each task-specific set gives s · cos logits over the seen classes; the set whose softmax has the lowest
entropy is chosen per image; the answer is softmax(its logits) + softmax(the universal logits). In the authors'
evaluation the universal logits come from the working adapters, i.e. the last task's own set (their merged
adapters are computed but their forward picks `cur_adapter` for the id it is called with): that is
`universal_adapter: latest`, the default that reproduces their numbers; `merged` runs the merge, as the paper
describes. After the first task, the prediction is the cosine logits of task 0's set alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.alignment_config import AlignmentConfig
from carecl.classifiers import CosineClassifier
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, Phase, StateHolder, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.statistics import ClassFeatureSums, GaussianClassStatistics
from carecl.tuners.adapter import AdapterConfig, ParallelAdapterInjector
from carecl.tuners.adapter_bank import AdapterBankInjector


def tuna_alignment() -> AlignmentConfig:
    """Their `classifer_align`: `crct_epochs` at `ca_lr`, CosineAnnealingLR(T_max=5), 5 x batch size samples per
    class, the release's decay formula when `decay` is set (their ImageNet-R / -A / ObjectNet configs)."""
    return AlignmentConfig(epochs=30, lr=0.005, scheduler_t_max=5, samples_per_class=None, decay=True,
                           decay_formula="release")


@dataclass
class TUNAConfig(MethodConfig):
    name: str = "tuna"
    # The adapters: their ViT hard-codes bottleneck 16, scale 0.1, dropout 0.1, no LayerNorm (`r` is unused).
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(bottleneck=16))
    # CosFace scale s and margin m (`scale`, `m`); s also scales the entropy and alignment logits.
    scale: float = 20.0
    margin: float = 0.0
    # Weight of the orthogonality penalty (`reg`); 0 turns it off (`use_orth: false`, their CIFAR config).
    orthogonality_weight: float = 0.001
    # Their penalty also reaches the finished sets' up projections, which sit in their optimiser: those keep
    # training (by the penalty and weight decay) while later tasks train. false: finished sets stay frozen.
    penalty_trains_finished_sets: bool = True
    # Which adapters give the universal logits at inference (module docstring).
    universal_adapter: Literal["latest", "merged"] = "latest"
    covariance_ridge: float = 1e-4
    alignment: AlignmentConfig = field(default_factory=tuna_alignment)

    def validate(self) -> None:
        self.adapter.validate()
        require(self.scale > 0, "scale", f"must be positive, got {self.scale}")
        require(self.orthogonality_weight >= 0, "orthogonality_weight", f"must be >= 0, got {self.orthogonality_weight}")
        require(self.covariance_ridge >= 0, "covariance_ridge", f"must be >= 0, got {self.covariance_ridge}")
        self.alignment.validate()


def emr_unified(stacked: Tensor) -> Tensor:
    """EMR-merging's unified task vector of (tasks, ...) weights: the sign of their mean (+1 where it is > 0, else
    -1) times the largest magnitude among the tasks whose weight has that sign (0 where none does)."""
    sign = torch.where(stacked.mean(0) > 0, 1.0, -1.0).to(stacked.dtype)
    agreeing = (stacked * sign) > 0
    return (stacked.abs() * agreeing).amax(0) * sign


def prediction_entropy(logits: Tensor) -> Tensor:
    """-Σ p log(p + 1e-10) of softmax(logits) over the last dimension (their entropy, epsilon included)."""
    probabilities = logits.softmax(-1)
    return -(probabilities * torch.log(probabilities + 1e-10)).sum(-1)


@register_method("tuna", TUNAConfig)
class TUNA(Method):
    options: TUNAConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options = self.options
        self.backbone = backbone
        self.working = ParallelAdapterInjector(backbone, options.adapter)  # trained on every task, never reset
        self.bank = AdapterBankInjector(backbone, options.adapter)  # the task-specific sets
        self.merged = AdapterBankInjector(backbone, options.adapter)  # one set: the universal adapters
        self.merged.add_set().requires_grad_(False)
        self.classifier = CosineClassifier(backbone.num_features)
        self.statistics = GaussianClassStatistics(options.alignment.storage, ridge=options.covariance_ridge)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # ---- training ------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        self.bank.add_set().requires_grad_(False)
        self.classifier.add_block(task.size)
        for parameter in self.finished_up_projections(task.index):
            parameter.requires_grad_(True)

    def finished_up_projections(self, n_finished: int) -> list[nn.Parameter]:
        """The finished sets' up projections that the penalty trains (module docstring), if it does."""
        options = self.options
        if options.orthogonality_weight == 0 or not options.penalty_trains_finished_sets:
            return []
        return [adapter.up.weight for adapters in self.bank.sets[:n_finished] for adapter in adapters]

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        return [Phase.from_train("adapter", train)] if train.epochs > 0 else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        # Every head trains (their fc, freeze_old=False); old heads get no loss gradient, only weight decay.
        finished = self.finished_up_projections(len(self.bank.sets) - 1)
        return [*self.working.adapters.parameters(), *finished, *self.classifier.parameters()]

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        cosines = self.classifier(self.backbone(images))[:, task.low: task.high]
        local = targets - task.low
        margin = self.options.margin * F.one_hot(local, task.size).to(cosines.dtype)
        loss = F.cross_entropy(self.options.scale * (cosines - margin), local)
        logs = {"cosface": loss.item()}
        if task.index > 0 and self.options.orthogonality_weight > 0:
            penalty = self.orthogonality(task.index)
            loss = loss + self.options.orthogonality_weight * math.exp(-(task.index + 1)) * penalty
            logs["orthogonality"] = penalty.item()
        return StepOutput(loss, logs)

    def orthogonality(self, n_finished: int) -> Tensor:
        """Σ over finished tasks i and blocks L of |mean(n(U_L) n(U_i,L)ᵀ)| / depth, with n() normalising rows;
        the mean of a product of row-normalised matrices is the dot product of their row sums / width²."""
        depth = len(self.working.adapters)
        total = torch.zeros((), device=self.working.adapters[0].up.weight.device)
        for block, adapter in enumerate(self.working.adapters):
            current = F.normalize(adapter.up.weight, dim=1)
            width = current.shape[0]
            earlier = torch.stack([F.normalize(self.bank.sets[i][block].up.weight, dim=1).sum(0) for i in range(n_finished)])
            total = total + ((earlier @ current.sum(0)) / width ** 2).abs().sum() / depth
        return total

    # ---- end of task: snapshot, merge, statistics, alignment --------------------------------
    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        task = context.task
        self.eval()
        for destination, source in zip(self.bank.sets[task.index].parameters(), self.working.adapters.parameters()):
            destination.copy_(source)
        for parameter in self.bank.parameters():
            parameter.requires_grad_(False)
        if task.index > 0:
            self.merge(task.index + 1)
        sums = ClassFeatureSums(task.low, task.high, self.backbone.num_features, self.options.alignment.storage)
        for images, labels in context.statistics_loader():
            sums.add(self.backbone(images.to(context.device)), labels)
        sums.reduce_(context.distributed)
        sums.store_into(self.statistics)
        if task.index > 0:
            self.align_head(self.classifier, self.statistics, self.options.alignment, context, "tuna",
                            scale=self.options.scale)

    def merge(self, n_sets: int) -> None:
        """The universal adapters: EMR-merging's unified vector of the first `n_sets` task-specific sets."""
        sets = [list(self.bank.sets[i].parameters()) for i in range(n_sets)]
        for position, destination in enumerate(self.merged.sets[0].parameters()):
            destination.copy_(emr_unified(torch.stack([parameters[position] for parameters in sets])))

    # ---- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def task_logits(self, images: Tensor) -> Tensor:
        """(batch, tasks, seen classes): s · cos through each learned task's own adapters."""
        with self.working.bypassed():
            features = self.bank.features_of_sets(images, range(self.n_learned_tasks))
        return self.options.scale * self.classifier(features)[..., :self.n_seen_classes]

    @torch.no_grad()
    def universal_logits(self, images: Tensor, task_logits: Tensor) -> Tensor:
        if self.options.universal_adapter == "latest":
            return task_logits[:, -1]
        with self.working.bypassed(), self.merged.using(0):
            features = self.backbone(images)
        return self.options.scale * self.classifier(features)[:, :self.n_seen_classes]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        logits = self.task_logits(images).float()
        if self.n_learned_tasks == 1:
            return logits[:, 0]
        chosen = prediction_entropy(logits).argmin(dim=1)
        specific = logits[torch.arange(len(images), device=logits.device), chosen]
        return specific.softmax(-1) + self.universal_logits(images, logits).float().softmax(-1)

    @torch.no_grad()
    def class_probabilities(self, images: Tensor) -> Tensor:
        scores = self.predict(images)
        return scores.softmax(-1) if self.n_learned_tasks == 1 else scores / 2

    def saved_states(self) -> dict[str, StateHolder]:
        return {"statistics": self.statistics}
