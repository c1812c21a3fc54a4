"""MoAL ("Knowledge Memorization and Rumination for Pre-trained Model-based Class-Incremental Learning", Gao et al.,
CVPR 2025: MOmentum-based Analytical Learning; code Zi-Jian-Gao/Moal, `models/adapt_ac_com_sdc_EMA_auto.py`).

- First task: parallel adapters and a σ·cosine head trained by cross-entropy (`train.epochs`, `train.lr`).
  Then the analytic head: features through a fixed random buffer and a ReLU, h = ReLU(W_b f) (`hidden`
  wide), W = 0.9 (Σhhᵀ + λI)⁻¹ Σhyᵀ with λ validated on the task (RanPAC's rule), R = (Σhhᵀ + λI)⁻¹ kept.
- Each later task: the adapters keep training with a growing σ·cosine head over every seen class
  (`progressive_epochs` at `progressive_lr`); after every epoch a moving average of the adapters moves
  towards them with momentum `alpha`, and at the end the adapters are set to that average (knowledge
  memorization with a little plasticity). Old class means are then carried into the new feature space by
  a linear map fitted from the previous task's adapters' features to the new ones on the task's images;
  the analytic head is updated by recursive least squares on the task's images, then again on the
  images it gets wrong among the new classes' features and, for every old class, the features of its
  nearest new class shifted by the difference of the two means (knowledge rumination).
Predictions come from the analytic head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from carecl.classifiers import ScaledCosineHead, one_hot, select_ridge, woodbury_update_
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, ParameterGroup, Phase, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.tuners.adapter import AdapterConfig, ParallelAdapterInjector

FIRST, PROGRESSIVE = "first-session adaptation", "progressive adaptation"
RIDGES = tuple(10.0 ** k for k in range(-8, 9))


@dataclass
class MoALConfig(MethodConfig):
    name: str = "moal"
    # The adapters (PILOT's: scale 0.1, dropout 0.1; the authors' ffn_num).
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # Width of the analytic head's random buffer (the authors' Hidden: 5,000-20,000 by benchmark).
    hidden: int = 20000
    # Momentum of the adapters' moving average, one step per epoch (alpha).
    alpha: float = 0.999
    # Later tasks' training (progreesive_epoch, progressive_lr); the first task trains train.epochs at train.lr.
    progressive_epochs: int = 80
    progressive_lr: float = 0.01
    # The first task's analytic weights are scaled by this (their 0.9 x Δ).
    first_weight_scale: float = 0.9
    # The linear map that carries old class means (their SimpleNN: 1000 epochs, SGD 0.01, cosine of period 10).
    calibration_epochs: int = 1000
    calibration_lr: float = 0.01
    calibration_batch_size: int = 32

    moved_keys = {"adapter_bottleneck": "adapter.bottleneck"}

    def validate(self) -> None:
        require(self.hidden > 0, "hidden", f"must be positive, got {self.hidden}")
        require(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.progressive_epochs >= 0, "progressive_epochs", f"must be >= 0, got {self.progressive_epochs}")
        require(self.progressive_lr > 0, "progressive_lr", f"must be positive, got {self.progressive_lr}")
        require(self.calibration_epochs >= 0, "calibration_epochs", f"must be >= 0, got {self.calibration_epochs}")
        require(self.calibration_batch_size > 0, "calibration_batch_size",
                f"must be positive, got {self.calibration_batch_size}")


def rls_update(inverse: Tensor, weight: Tensor, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """One recursive least-squares step (Woodbury): R ← R − R Hᵀ (I + H R Hᵀ)⁻¹ H R (in place: R is the one h × h
    matrix, never copied), W ← W + R Hᵀ (Y − H W) (a new W)."""
    woodbury_update_(inverse, hidden)
    return inverse, (weight + inverse @ hidden.T @ (targets - hidden @ weight)).contiguous()


def first_analytic_fit(hidden: Tensor, targets: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(R, W) of the first task: λ validated on the rows' last 20 %, R = (HᵀH + λI)⁻¹ (inverted in float64),
    W = scale · R HᵀY, both row-major in the rows' dtype (as a checkpoint reloads them)."""
    ridge = select_ridge(hidden, targets, RIDGES)
    gram = (hidden.T @ hidden).double()
    gram.diagonal().add_(ridge)
    factor = torch.linalg.cholesky(gram)
    del gram
    inverse = torch.cholesky_inverse(factor).to(hidden.dtype).contiguous()
    del factor
    return inverse, (scale * (inverse @ (hidden.T @ targets))).contiguous()


@register_method("moal", MoALConfig)
class MoAL(Method):
    options: MoALConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options, width = self.options, backbone.num_features
        self.backbone = backbone
        self.tuner = ParallelAdapterInjector(backbone, options.adapter)
        self.first_head = ScaledCosineHead(width, scenario.sizes[0])
        # The σ·cosine head of later tasks: the first task's classes re-drawn, then zero rows per task.
        self.head_weight = nn.Parameter(torch.zeros(0, width))
        self.head_sigma = nn.Parameter(torch.ones(1))
        generator = torch.Generator().manual_seed(config.seed)
        bound = 1.0 / math.sqrt(width)  # nn.Linear's default, as their AC_Linear's buffer
        self.register_buffer("random_buffer", torch.empty(options.hidden, width).uniform_(-bound, bound, generator=generator))
        self.register_buffer("analytic_weight", torch.zeros(options.hidden, 0))
        self.register_buffer("analytic_inverse", torch.zeros(0, 0))
        self.register_buffer("class_means", torch.zeros(scenario.n_classes, width))
        adapters = parameters_to_vector(self.tuner.adapters.parameters())
        self.register_buffer("moving_average", torch.zeros_like(adapters))
        self.register_buffer("previous_adapters", adapters.detach().clone())
        self.register_buffer("phase_kind", torch.zeros((), dtype=torch.long))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # ---- growth ------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        grown = torch.zeros(self.options.hidden, task.size, device=self.analytic_weight.device)
        self.analytic_weight = torch.cat([self.analytic_weight, grown], dim=1)
        if task.index == 0:
            return
        width, device = self.head_weight.shape[1], self.head_weight.device
        rows = torch.zeros(task.size, width, device=device)
        if task.index == 1:  # their dual-branch network draws a fresh head for the first task's classes
            bound = 1.0 / math.sqrt(width)
            generator = torch.Generator().manual_seed(self.experiment.seed + 1)
            first = torch.empty(self.scenario.sizes[0], width).uniform_(-bound, bound, generator=generator)
            rows = torch.cat([first.to(device), rows])
            self.head_sigma.data.fill_(1.0)
        self.head_weight = nn.Parameter(torch.cat([self.head_weight.detach(), rows]))

    # ---- training ----------------------------------------------------------------------
    def training_phases(self, task: Task) -> list[Phase]:
        train, options = self.experiment.train, self.options
        if task.index == 0:
            return [Phase.from_train(FIRST, train)] if train.epochs else []
        epochs = options.progressive_epochs
        return [Phase.from_train(PROGRESSIVE, train, epochs=epochs, lr=options.progressive_lr)] if epochs else []

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        head = list(self.first_head.parameters()) if phase.name == FIRST else [self.head_weight, self.head_sigma]
        return [ParameterGroup([*self.tuner.adapters.parameters(), *head])]

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        self.phase_kind.fill_(0 if phase.name == FIRST else 1)
        if phase.name == PROGRESSIVE:
            self.moving_average.copy_(self.adapter_vector())

    def after_epoch(self, phase: Phase, epoch: int) -> None:
        if phase.name == PROGRESSIVE:
            alpha = self.options.alpha
            self.moving_average.mul_(alpha).add_(self.adapter_vector(), alpha=1 - alpha)

    def end_phase(self, phase: Phase, context: TaskContext) -> None:
        if phase.name == PROGRESSIVE:
            self.set_adapters(self.moving_average)

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        features = self.backbone(images)
        if int(self.phase_kind) == 0:
            logits = self.first_head(features)
            return StepOutput(F.cross_entropy(logits, targets - task.low))
        logits = self.head_sigma * F.linear(F.normalize(features, dim=-1), F.normalize(self.head_weight, dim=-1))
        return StepOutput(F.cross_entropy(logits[:, :task.high], targets))

    # ---- the adapters as one vector (moving average, previous task's copy) ------------------
    def adapter_vector(self) -> Tensor:
        return parameters_to_vector(self.tuner.adapters.parameters()).detach()

    @torch.no_grad()
    def set_adapters(self, vector: Tensor) -> None:
        """Copy `vector` into the adapters (copies: torch's vector_to_parameters would make them views of it)."""
        start = 0
        for parameter in self.tuner.adapters.parameters():
            parameter.copy_(vector[start:start + parameter.numel()].view_as(parameter))
            start += parameter.numel()

    # ---- after each task: class means, mean calibration, the analytic head -------------------
    def end_task(self, context: TaskContext) -> None:
        self.eval()
        task = context.task
        features, labels = context.embed_task_images(self.backbone, "MoAL's class means")
        for position in range(task.low, task.high):
            self.class_means[position] = features[labels == position].mean(0)
        if task.index == 0:
            self.first_head.requires_grad_(False)
            self.fit_first_analytic_head(context)
        else:
            self.calibrate_old_means(context)
            self.update_analytic_head(self.augmented_batches(context, 2), task)
            self.ruminate(features, labels, task)
        self.previous_adapters.copy_(self.adapter_vector())

    def expand(self, features: Tensor) -> Tensor:
        return F.relu(features.to(self.random_buffer.dtype) @ self.random_buffer.T)

    def augmented_batches(self, context: TaskContext, pass_number: int):
        """The task's training images with training transforms (their train_loader), features and labels per batch."""
        batches = context.training_batches(self.experiment.train.batch_size, pass_number, "MoAL's analytic head")
        for images, labels in tqdm(batches, desc=f"task {context.task.index + 1} analytic head", leave=False,
                                   disable=not context.progress):
            yield self.backbone(images.to(context.device)), labels.to(context.device)

    @torch.no_grad()
    def fit_first_analytic_head(self, context: TaskContext) -> None:
        hidden, labels = [], []
        for features, targets in self.augmented_batches(context, 1):
            hidden.append(self.expand(features))
            labels.append(targets)
        h, y = torch.cat(hidden), one_hot(torch.cat(labels), context.task.high, self.random_buffer.dtype)
        self.analytic_inverse, self.analytic_weight = first_analytic_fit(h, y, self.options.first_weight_scale)

    @torch.no_grad()
    def update_analytic_head(self, batches, task: Task, wrong_only: bool = False) -> None:
        """RLS over `batches`; `wrong_only`: only the rows the head misclassified *before* this update (their
        cali_weight judges every batch with the head as it was, not as the updates move it)."""
        inverse, weight = self.analytic_inverse, self.analytic_weight
        judge = weight
        for features, targets in batches:
            hidden = self.expand(features)
            if wrong_only:
                wrong = (hidden @ judge).argmax(dim=1) != targets
                hidden, targets = hidden[wrong], targets[wrong]
            if len(targets):
                inverse, weight = rls_update(inverse, weight, hidden, one_hot(targets, task.high, hidden.dtype))
        self.analytic_inverse, self.analytic_weight = inverse, weight

    @torch.no_grad()
    def ruminate(self, features: Tensor, labels: Tensor, task: Task) -> None:
        """RLS on the misclassified among the new classes' features and the old classes' pseudo-features (each
        old class: its nearest new class's features moved by the difference of their means)."""
        all_features, all_labels = rumination_set(features, labels, self.class_means, task)
        generator = torch.Generator().manual_seed(self.experiment.seed * 7 + task.index)
        order = torch.randperm(len(all_labels), generator=generator).to(all_labels.device)
        size = self.experiment.train.batch_size
        batches = ((all_features[order[i:i + size]], all_labels[order[i:i + size]]) for i in range(0, len(order), size))
        self.update_analytic_head(batches, task, wrong_only=True)

    def calibrate_old_means(self, context: TaskContext) -> None:
        """Fit a linear map from the previous task's adapter features to the current ones; move the old means by it."""
        current = self.adapter_vector()
        old_features, new_features = [], []
        with torch.no_grad():
            batches = context.training_batches(self.experiment.train.batch_size, 3, "MoAL's mean calibration")
            for images, _ in batches:
                images = images.to(context.device)
                self.set_adapters(self.previous_adapters)
                old_features.append(self.backbone(images))
                self.set_adapters(current)
                new_features.append(self.backbone(images))
        mapping = fit_linear_map(torch.cat(old_features), torch.cat(new_features), self.options,
                                 torch.Generator().manual_seed(self.experiment.seed * 5 + context.task.index),
                                 context.progress)
        with torch.no_grad():
            self.class_means[:context.task.low] = mapping(self.class_means[:context.task.low])

    # ---- prediction --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.expand(self.backbone(images)) @ self.analytic_weight[:, :self.n_seen_classes]

    def load_state_tensors(self, tensors: dict[str, Tensor], grow: bool = False) -> None:
        saved = tensors.get("analytic_inverse")
        if saved is not None and saved.shape != self.analytic_inverse.shape:
            self.analytic_inverse = torch.empty_like(saved, device=self.analytic_inverse.device)
        super().load_state_tensors(tensors, grow)


def rumination_set(features: Tensor, labels: Tensor, means: Tensor, task: Task) -> tuple[Tensor, Tensor]:
    """The new classes' features, then for each old class the features of its most cosine-similar new class
    moved by the difference of the two means (their _build_feature_set)."""
    old, new = F.normalize(means[:task.low], dim=1), F.normalize(means[task.low:task.high], dim=1)
    nearest = (old @ new.T).argmax(dim=1) + task.low
    pseudo = [features[labels == n] - means[n] + means[c] for c, n in enumerate(nearest.tolist())]
    pseudo_labels = [torch.full((len(p),), c, device=labels.device) for c, p in enumerate(pseudo)]
    return torch.cat([features, *pseudo]), torch.cat([labels, *pseudo_labels])


def fit_linear_map(inputs: Tensor, targets: Tensor, options: MoALConfig, generator: torch.Generator,
                   progress: bool = False) -> nn.Linear:
    """Their SimpleNN: a Linear trained by MSE on a 90 % split with SGD (momentum 0.9, weight decay 5e-4) and a
    cosine of period 10 epochs, keeping the weights with the lowest loss on the other 10 %."""
    mapping = nn.Linear(inputs.shape[1], targets.shape[1]).to(inputs.device)
    order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
    cut = int(0.9 * len(inputs))
    train, held_out = order[:cut], order[cut:]
    optimizer = torch.optim.SGD(mapping.parameters(), lr=options.calibration_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0)
    best, best_state = float("inf"), copy.deepcopy(mapping.state_dict())
    for _ in tqdm(range(options.calibration_epochs), desc="mean calibration", leave=False, disable=not progress):
        shuffled = train[torch.randperm(len(train), generator=generator).to(train.device)]
        for start in range(0, len(shuffled), options.calibration_batch_size):
            rows = shuffled[start:start + options.calibration_batch_size]
            loss = F.mse_loss(mapping(inputs[rows]), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            held_out_loss = F.mse_loss(mapping(inputs[held_out]), targets[held_out]).item() if len(held_out) else 0.0
        if held_out_loss < best:
            best, best_state = held_out_loss, copy.deepcopy(mapping.state_dict())
    mapping.load_state_dict(best_state)
    return mapping.eval()
