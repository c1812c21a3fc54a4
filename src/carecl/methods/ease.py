"""EASE ("Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning", Zhou et
al., CVPR 2024; code sun-hailong/CVPR24-Ease, also in LAMDA-PILOT): every task trains a new set of
parallel adapters (one per block) with a σ·cosine head over the task's own classes; older sets are frozen.
Each set spans a feature subspace: an image's feature is the ViT's CLS feature under every set.

Classes are prototypes in every subspace. A new class gets its real mean in all subspaces. An old class
has no images in a newer subspace, so its prototype there is synthesised ("prototype complement"): in
the old class's own subspace, its similarity to the classes that do have images in the newer subspace
(softmax over cosines) weights their prototypes there. With `reweight` (the authors' default) the score
of class k is Σ_s w_ks cos(f_s, p_ks): w = 1 in k's own subspace, alpha / (tasks - 1) elsewhere, and beta
for the frozen ViT's subspace when `use_init_ptm` adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.classifiers import ScaledCosineHead
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, Phase, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.tuners.adapter import FLAT_ADAPTER_KEYS, AdapterConfig
from carecl.tuners.adapter_bank import AdapterBankInjector


@dataclass
class EASEConfig(MethodConfig):
    name: str = "ease"
    # Each task's adapters: bottleneck width (the authors' `ffn_num`), output scale, dropout.
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # Weight of a class's similarity in the other tasks' subspaces, divided by their number (`alpha`).
    alpha: float = 0.1
    # false: plain cosine over the concatenated subspaces (`use_reweight: false`).
    reweight: bool = True
    # Add the frozen ViT's own feature as a subspace, weighted by beta (`use_init_ptm`, `beta`).
    use_init_ptm: bool = False
    beta: float = 0.0
    # Task-free inference repeats each image once per subspace: at most this many images per ViT forward.
    images_per_pass: int = 512

    moved_keys = FLAT_ADAPTER_KEYS

    def validate(self) -> None:
        require(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")
        require(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        require(self.images_per_pass > 0, "images_per_pass", f"must be positive, got {self.images_per_pass}")


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


@register_method("ease", EASEConfig)
class EASE(Method):
    options: EASEConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options = self.options
        self.backbone = backbone
        self.bank = AdapterBankInjector(backbone, options.adapter)
        self.proxy_head: ScaledCosineHead | None = None
        # prototypes[k, s]: class k's mean feature in subspace s (the frozen ViT first with use_init_ptm).
        self.register_buffer("prototypes", torch.zeros(0, 0, backbone.num_features))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    @property
    def ptm_subspaces(self) -> int:
        return int(self.options.use_init_ptm)

    @property
    def n_subspaces(self) -> int:
        return self.ptm_subspaces + len(self.bank.sets)

    # ---- growth and training -----------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        for adapters in self.bank.sets:
            adapters.requires_grad_(False)
        self.bank.add_set()
        width = self.backbone.num_features
        self.proxy_head = ScaledCosineHead(width, task.size).to(self.prototypes.device)
        grown = self.prototypes.new_zeros(task.high, self.n_subspaces, width)
        grown[: self.prototypes.shape[0], : self.prototypes.shape[1]] = self.prototypes
        self.prototypes = grown

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        if train.epochs == 0:
            return []
        return [Phase.from_train("task adapters", train)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.bank.sets[-1].parameters(), *self.proxy_head.parameters()]

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        with self.bank.using(task.index):
            features = self.backbone(images)
        loss = F.cross_entropy(self.proxy_head(features), targets - task.low)
        return StepOutput(loss, {"loss": loss.item()})

    # ---- subspaces and prototypes -----------------------------------------------------------
    def subspace_features(self, images: Tensor) -> Tensor:
        """(batch, subspaces, width): the CLS feature under every task's adapters (and the frozen ViT)."""
        parts = []
        if self.options.use_init_ptm:
            with self.bank.using(None):
                parts.append(self.backbone(images)[:, None])
        parts.append(self.bank.features_of_sets(images, range(len(self.bank.sets)), self.options.images_per_pass))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        self.bank.sets[-1].requires_grad_(False)
        self.proxy_head.requires_grad_(False)
        self.eval()
        task = context.task
        sums = self.prototypes.new_zeros(task.size, self.n_subspaces, self.backbone.num_features)
        counts = self.prototypes.new_zeros(task.size)
        for images, targets in context.statistics_loader():
            index = targets.to(context.device) - task.low
            sums.index_add_(0, index, self.subspace_features(images.to(context.device)).to(sums.dtype))
            counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))
        context.distributed.all_reduce_sum_(sums)
        context.distributed.all_reduce_sum_(counts)
        self.prototypes[task.low: task.high] = sums / counts.clamp(min=1)[:, None, None]
        self.complement_old_classes(task.index)

    def complement_old_classes(self, last_task: int) -> None:
        """Synthesise each old class's prototype in every newer subspace (the authors' `solve_sim_reset`)."""
        bounds, offset, prototypes = self.scenario.boundaries, self.ptm_subspaces, self.prototypes
        for old in range(last_task):
            own = slice(int(bounds[old]), int(bounds[old + 1]))
            for newer in range(old + 1, last_task + 1):
                # The classes with images in subspace `newer`: those of task `newer` and later.
                present = slice(int(bounds[newer]), int(bounds[last_task + 1]))
                weights = F.softmax(cosine_matrix(prototypes[own, old + offset], prototypes[present, old + offset]), dim=1)
                prototypes[own, newer + offset] = weights @ prototypes[present, newer + offset]

    # ---- scores ----------------------------------------------------------------------------
    def subspace_weights(self, n_classes: int) -> Tensor:
        """(classes, subspaces): 1 in a class's own task subspace, alpha / (tasks - 1) in the others."""
        n_tasks = len(self.bank.sets)
        own_task = torch.as_tensor(self.scenario.task_of_class()[:n_classes], device=self.prototypes.device).long()
        weights = self.prototypes.new_full((n_classes, n_tasks), self.options.alpha / max(n_tasks - 1, 1))
        weights[torch.arange(n_classes, device=weights.device), own_task] = 1.0
        if self.options.use_init_ptm:
            weights = torch.cat([weights.new_full((n_classes, 1), self.options.beta), weights], dim=1)
        return weights

    def class_scores(self, features: Tensor) -> Tensor:
        prototypes = self.prototypes[: self.n_seen_classes]
        if not self.options.reweight:
            return cosine_matrix(features.flatten(1), prototypes.flatten(1))
        cosines = torch.einsum("bsc,ksc->bks", F.normalize(features, dim=-1), F.normalize(prototypes, dim=-1))
        return (cosines * self.subspace_weights(prototypes.shape[0])).sum(-1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.class_scores(self.subspace_features(images).float())
