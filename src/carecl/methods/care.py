"""CaRE: continual learning with a Bi-Level Routing Mixture-of-Experts in every ViT block.

The learner = BR-MoE-adapted frozen ViT + cosine classifier (one block per task) + Gaussian
class statistics for classifier alignment. Behaviour follows the authors' release.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carecl.classifiers import CosineClassifier
from carecl.config import ExperimentConfig
from carecl.methods.base import Method, Phase, StateAccess, StateHolder, StepOutput, TaskContext, register_method
from carecl.methods.care_config import CareConfig
from carecl.scenario import Scenario, Task
from carecl.statistics import ClassFeatureSums, GaussianClassStatistics
from carecl.tuners.brmoe.model import BRMoEViT

def distillation_temperature(block: int, n_blocks: int) -> float:
    """T_ℓ = 1 in the first half of the blocks, 2 in the second (blocks 0-5 / 6-11 of ViT-B)."""
    return 1.0 if block < n_blocks // 2 else 2.0


@register_method("care", CareConfig)
class CaRE(Method):
    options: CareConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options = self.options
        self.backbone = backbone
        self.model = BRMoEViT(backbone, options.brmoe)
        self.classifier = CosineClassifier(self.model.embed_dim)
        self.statistics = GaussianClassStatistics(storage=options.alignment.storage)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # ---- the two outputs every CaRE learner offers -----------------------------------
    def features(self, images: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Final-norm CLS features: task-free forward (task=None) or task-known forward of `task`."""
        return self.model(images, task=task).features

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled cosine logits over all seen classes, task-free single pass."""
        return self.classifier(self.features(images))[:, : self.n_seen_classes]

    # ---- growth and schedule ----------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        self.model.add_task(task.size)
        self.classifier.add_block(task.size)

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        if task.index == 0:
            return [Phase.from_train("train", train)]
        half = train.epochs // 2
        # Release (models/care.py): a full cosine of its own down to lr/2, align, then a fresh
        # optimiser from that lr down to min_lr (not the first half of one long cosine).
        first = Phase("first half", half, train.lr, train.lr / 2, half)
        second = Phase("second half", half, first.final_lr, train.min_lr, half)
        return [first, second]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.model.trainable_parameters(), *self.classifier.parameters()]

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        if context.task.index > 0:
            self.model.set_anchor()
        else:
            self.model.clear_anchor()

    # ---- training ---------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, targets: torch.Tensor, task: Task) -> StepOutput:
        options = self.options
        output = self.model(images, task=task.index)
        cos_new = self.classifier(output.features)[:, task.low : task.high]
        local_targets = targets - task.low
        main = F.cross_entropy(options.scale * cos_new, local_targets)
        teacher = cos_new.detach()
        n_blocks = len(output.perceptron_logits)
        aux = torch.stack([
            self.auxiliary_loss(logits, teacher, local_targets, distillation_temperature(block, n_blocks))
            for block, logits in enumerate(output.perceptron_logits)
        ]).mean()
        return StepOutput(main + aux, {"main": main.item(), "aux": aux.item()})

    def auxiliary_loss(self, logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        options = self.options
        # Release: its "cosface" loss with margin 0 on raw perceptron logits is CE(τ·h).
        hard = F.cross_entropy(options.scale * logits if options.aux_cos_loss else logits, targets)
        if not options.self_dist_loss:
            return hard
        soft = F.kl_div(
            F.log_softmax(logits / temperature, dim=1), F.softmax(teacher / temperature, dim=1), reduction="batchmean"
        ) * temperature**2
        return (hard + soft) / 2

    # ---- class statistics and alignment -------------------------------------------------
    def end_phase(self, phase: Phase, context: TaskContext) -> None:
        self.update_statistics(context)
        # Release: alignment only once a second task exists (nothing to re-balance before).
        if context.task.index > 0:
            self.align(context, phase)

    @torch.no_grad()
    def update_statistics(self, context: TaskContext) -> None:
        """Mean and covariance of the task's classes from the task-known forward, test transforms
        (from sums reduced over ranks: exactly the single-process statistics under torchrun)."""
        self.eval()
        task = context.task
        sums = ClassFeatureSums(task.low, task.high, self.model.embed_dim, self.statistics.storage)
        for images, targets in context.statistics_loader():
            sums.add(self.features(images.to(context.device), task=task.index).float(), targets)
        sums.reduce_(context.distributed)
        sums.store_into(self.statistics)

    def align(self, context: TaskContext, phase: Phase) -> None:
        # One sampling stream per (seed, task, phase).
        self.align_head(self.classifier, self.statistics, self.options.alignment, context, phase.name,
                        scale=self.options.scale)

    # ---- prediction ------------------------------------------------------------------------
    def uses_iterative_prediction(self) -> bool:
        """Release: iterative from the second task while the task index is <= 60 (iter_pred_max_tasks = 61 learned)."""
        options = self.options
        return options.iter_pred and 1 < self.n_learned_tasks <= options.iter_pred_max_tasks

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.uses_iterative_prediction():
            return self.iterative_scores(images)
        return self.logits(images)

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """softmax(τ · cosine logits) in the single pass; the iterative prediction's sum of two softmaxes, halved."""
        if self.uses_iterative_prediction():
            return self.iterative_scores(images).float() / 2
        return (self.options.scale * self.logits(images)).float().softmax(dim=1)

    @torch.no_grad()
    def iterative_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Release `iter_pred`: the most confident task-known forward, plus the task-free one."""
        scale, n_seen = self.options.scale, self.n_seen_classes
        best_logits, best_entropy = None, None
        for task in range(self.n_learned_tasks):
            logits = scale * self.classifier(self.features(images, task=task))[:, :n_seen]
            probabilities = logits.softmax(dim=1)
            entropy = -(probabilities * torch.log(probabilities + 1e-10)).sum(dim=1)
            if best_logits is None:
                best_logits, best_entropy = logits, entropy
                continue
            better = entropy < best_entropy
            best_logits = torch.where(better[:, None], logits, best_logits)
            best_entropy = torch.minimum(entropy, best_entropy)
        return best_logits.softmax(dim=1) + (scale * self.logits(images)).softmax(dim=1)

    # ---- state -------------------------------------------------------------------------
    def saved_states(self) -> dict[str, StateHolder]:
        """Class statistics and, inside a phase of a later task, the shared-adapter anchor (begin_phase's
        snapshot, which a mid-phase resume restores instead of calling begin_phase)."""
        return {"statistics": self.statistics,
                "anchor": StateAccess(self.model.anchor_state, self.model.load_anchor_state)}
