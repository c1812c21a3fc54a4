"""HiDe-Prompt ("Hierarchical Decomposition of Prompt-Based Continual Learning", Wang et al., NeurIPS 2023; code
thu-ml/HiDe-Prompt, as forked by NoRGa's Minhchuyentoancbn/MoE_PromptCL), three parts learned in every task:

- task-identity inference (TII): an MLP (`tii_mlp_hidden`, residual + LayerNorm) and a head over all classes on
  the frozen ViT's CLS feature, trained with CE over the task's classes, then aligned on Gaussian samples of the
  frozen features of every seen class (their separate "original model" run, here the task's first phase);
- within-task prediction: one prefix prompt per task in blocks `prompt_layers`, slot t for task t (started from
  slot t - 1), mixed during training with the mean of the earlier slots ("prompt momentum": (1 - m) P_t +
  m mean(P_<t), the mean detached; P_t itself is mixed so once the task ends), a linear head over all
  classes, CE over the task's classes plus the contrastive regulariser of `regularisers.orthogonality_loss`;
- task-adaptive prediction: the head aligned on Gaussian samples of every seen class's prompted features.

At test the TII names a class, its task picks the slot, and the prompted ViT's head predicts. Kept from the
code: the key/value reshape of DualPrompt's PyTorch port (`kv_reshape_quirk`, see `dualprompt.py`), an
alignment epoch of only as many mini-batches as there are *old* classes (`alignment_steps`), and the batch
majority vote over TII slots (`batchwise_selection`, their 5-datasets setting; off by default as in theirs
for the other benchmarks). `norga.py` adds NoRGa's gate on the prefix scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.alignment_config import AlignmentConfig
from carecl.classifiers import linear_head
from carecl.config import ConfigError, ExperimentConfig, MethodConfig, require
from carecl.methods.base import ParameterGroup, Phase, StateHolder, StepOutput, TaskContext, register_method
from carecl.methods.prompt_learner import PromptLearner, prompted_blocks, slot_prefixes
from carecl.methods.regularisers import orthogonality_loss
from carecl.scenario import Scenario, Task
from carecl.statistics import ClassFeatureSums, GaussianClassStatistics
from carecl.tuners.prefix import PrefixInjector
from carecl.tuners.prompt_pool import majority_slots

TII_PHASE, PROMPT_PHASE = "task identity", "prompts"


def hide_alignment() -> AlignmentConfig:
    """Their `train_task_adaptive_prediction`: SGD (momentum 0.9, weight decay 0 from the args), cosine over
    `crct_epochs`, 5 x batch size samples per class, no decay of old means."""
    return AlignmentConfig(epochs=30, lr=0.005, scheduler_t_max=30, weight_decay=0.0, samples_per_class=None,
                           decay=False)


def tii_alignment() -> AlignmentConfig:
    """The TII run's alignment: as `hide_alignment`, samples_per_class null = the batch size (their n_s)."""
    return AlignmentConfig(epochs=30, lr=0.0025, scheduler_t_max=30, weight_decay=0.0, samples_per_class=None,
                           decay=False)


@dataclass
class HiDePromptConfig(MethodConfig):
    name: str = "hide_prompt"
    # Prefixed blocks; null = blocks 0-4 (those the ViT has).
    prompt_layers: list[int] | None = None
    prompt_length: int = 5
    # Slots in the pool; null = one per task.
    pool_size: int | None = None
    prompt_momentum: float = 0.01
    # `reg`, the weight of the contrastive regulariser (temperature 0.8).
    orthogonality_weight: float = 0.1
    # `larger_prompt_lr`: the head trains at lr x 0.1; 1.0 without it.
    head_lr_scale: float = 0.1
    copy_previous_slot: bool = True
    kv_reshape_quirk: bool = True
    batchwise_selection: bool = False
    # The prompts phase's schedule: constant, cosine to train.min_lr, or steps x 0.1 at `milestones`.
    schedule: Literal["constant", "cosine", "step"] = "constant"
    milestones: list[int] = field(default_factory=list)
    covariance_ridge: float = 1e-4
    alignment: AlignmentConfig = field(default_factory=hide_alignment)
    # "old_classes": their alignment epochs step once per class of earlier tasks; "seen_classes": once per seen class.
    alignment_steps: Literal["old_classes", "seen_classes"] = "old_classes"
    tii_mlp_hidden: list[int] = field(default_factory=lambda: [2])
    tii_epochs: int = 20
    # The TII run's Adam lr, already scaled by batch / 256 as their trainer does (5e-4 x 128 / 256).
    tii_lr: float = 0.00025
    tii_alignment: AlignmentConfig = field(default_factory=tii_alignment)

    def validate(self) -> None:
        require(self.prompt_layers is None or len(self.prompt_layers) > 0, "prompt_layers", "must name at least one block")
        require(self.prompt_length > 0, "prompt_length", f"must be positive, got {self.prompt_length}")
        require(self.pool_size is None or self.pool_size > 0, "pool_size", f"must be positive, got {self.pool_size}")
        require(0.0 <= self.prompt_momentum < 1.0, "prompt_momentum", f"must be in [0, 1), got {self.prompt_momentum}")
        require(self.orthogonality_weight >= 0, "orthogonality_weight", f"must be >= 0, got {self.orthogonality_weight}")
        require(self.head_lr_scale >= 0, "head_lr_scale", f"must be >= 0, got {self.head_lr_scale}")
        require(self.schedule == "step" or not self.milestones, "milestones", "only apply to schedule: step")
        require(all(h > 0 for h in self.tii_mlp_hidden), "tii_mlp_hidden", f"must be positive, got {self.tii_mlp_hidden}")
        require(self.tii_epochs >= 0, "tii_epochs", f"must be >= 0, got {self.tii_epochs}")
        require(self.tii_lr > 0, "tii_lr", f"must be positive, got {self.tii_lr}")
        self.alignment.validate()
        self.tii_alignment.validate()


class TaskIdentityMLP(nn.Module):
    """Their MlpMapping: widths C -> C h_0 -> ... -> C; GELU after every layer except the middle one (a LayerNorm
    there) and the last; residual, then a LayerNorm. Linear layers in timm's init, as their ViT applies it."""

    def __init__(self, width: int, hidden: list[int]) -> None:
        super().__init__()
        sizes = [width, *[width * h for h in hidden], width]
        layers = []
        for i in range(len(sizes) - 1):
            linear = nn.Linear(sizes[i], sizes[i + 1])
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
            if i == len(sizes) - 2:
                layers.append(linear)
            elif i == len(hidden) // 2 and i != 0:
                layers.append(nn.Sequential(linear, nn.LayerNorm(sizes[i + 1])))
            else:
                layers.append(nn.Sequential(linear, nn.GELU()))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.layers(x) + x)


@register_method("hide_prompt", HiDePromptConfig)
class HiDePrompt(PromptLearner):
    options: HiDePromptConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options, width = self.options, backbone.num_features
        self.layers = prompted_blocks(options.prompt_layers, [0, 1, 2, 3, 4], len(backbone.blocks), "prompt_layers")
        pool = options.pool_size or scenario.n_tasks
        if pool < scenario.n_tasks:
            raise ConfigError(f"method.pool_size {pool} is smaller than the {scenario.n_tasks} tasks (one slot per task)")
        self.prefixes = PrefixInjector(backbone, self.layers)
        self.injectors = [self.prefixes]
        # (slots, layers, key/value, length, C), U(-1, 1) as theirs.
        self.prompts = nn.Parameter(torch.empty(pool, len(self.layers), 2, options.prompt_length, width)
                                    .uniform_(-1, 1))
        self.tii_mlp = TaskIdentityMLP(width, options.tii_mlp_hidden)
        self.tii_head = linear_head(width, int(scenario.boundaries[-1]))
        self.statistics = GaussianClassStatistics(options.alignment.storage, ridge=options.covariance_ridge)
        self.tii_statistics = GaussianClassStatistics(options.tii_alignment.storage, ridge=options.covariance_ridge)
        # Which phase the training steps belong to (0: task identity, 1: prompts), saved for a mid-phase resume.
        self.register_buffer("phase_index", torch.zeros((), dtype=torch.long))

    # ---- phases ----------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        if self.options.copy_previous_slot and task.index > 0:
            with torch.no_grad():
                self.prompts[task.index] = self.prompts[task.index - 1]

    def training_phases(self, task: Task) -> list[Phase]:
        train, options = self.experiment.train, self.options
        phases = []
        if options.tii_epochs > 0:
            phases.append(Phase(TII_PHASE, options.tii_epochs, options.tii_lr, options.tii_lr, options.tii_epochs))
        if train.epochs > 0:
            min_lr = train.lr if options.schedule == "constant" else train.min_lr
            phases.append(Phase(PROMPT_PHASE, train.epochs, train.lr, min_lr, train.epochs,
                                milestones=tuple(options.milestones) if options.schedule == "step" else ()))
        return phases

    def prompt_parameters(self) -> list[nn.Parameter]:
        """What trains at the prompt lr (NoRGa adds its gate scales while they are not frozen)."""
        return [self.prompts]

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        if phase.name == TII_PHASE:
            return [ParameterGroup([*self.tii_mlp.parameters(), *self.tii_head.parameters()], name="task identity")]
        return [ParameterGroup(self.prompt_parameters(), name="prompts"),
                ParameterGroup(list(self.head.parameters()), lr_scale=self.options.head_lr_scale, name="head")]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.prompt_parameters(), *self.head.parameters(), *self.tii_mlp.parameters(),
                *self.tii_head.parameters()]

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        self.phase_index.fill_(0 if phase.name == TII_PHASE else 1)

    # ---- forwards ------------------------------------------------------------------------------
    def tii_logits(self, frozen: Tensor) -> Tensor:
        return self.tii_head(self.tii_mlp(frozen))

    def slot_prompts(self, slots: Tensor, task: Task | None) -> Tensor:
        """(B, layers, 2, length, C): each image's slot; while training task t > 0, mixed with the earlier slots."""
        prompts = self.prompts[slots]
        momentum = self.options.prompt_momentum
        if task is not None and task.index > 0 and momentum > 0:
            earlier = self.prompts[: task.index].detach().mean(0)
            prompts = (1 - momentum) * prompts + momentum * earlier
        return prompts

    def features_with_slots(self, images: Tensor, task: Task | None, slots: Tensor | None = None) -> Tensor:
        """The CLS feature with each image's slot (training: the task's; test: `slots`) prefixed."""
        if task is not None:
            slots = self.slots_of(task, images)
        per_block = slot_prefixes(self.slot_prompts(slots, task), self.layers, self.options.kv_reshape_quirk)
        with self.prefixes.prefixes(per_block):
            return self.backbone(images)

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        if int(self.phase_index) == 0:
            logits = self.tii_logits(self.query(images))[:, task.low: task.high]
            loss = F.cross_entropy(logits, targets - task.low)
            return StepOutput(loss, {"tii_loss": loss.item()})
        features = self.features_with_slots(images, task)
        classification = self.current_task_loss(features, targets, task)
        regulariser = orthogonality_loss(features, self.statistics.mean_table(task.low, features.device), 0.8)
        loss = classification + self.options.orthogonality_weight * regulariser
        return StepOutput(loss, {"loss": loss.item(), "orthogonality": regulariser.item()})

    # ---- end of each phase: statistics and alignment --------------------------------------
    @torch.no_grad()
    def end_phase(self, phase: Phase, context: TaskContext) -> None:
        task = context.task
        self.eval()
        if phase.name == TII_PHASE:
            self.collect_statistics(context, self.tii_statistics, self.query)
            if task.index > 0:
                self.align(context, self.tii_statistics, nn.ModuleList([self.tii_mlp, self.tii_head]), self.tii_logits,
                           self.tii_alignment_config(), "tii")
            return
        self.merge_slot(task.index)
        self.collect_statistics(context, self.statistics,
                                lambda images: self.features_with_slots(images, None, self.slots_of(task, images)))
        if task.index > 0:
            self.align(context, self.statistics, self.head, self.head, self.options.alignment, "head")

    def slots_of(self, task: Task, images: Tensor) -> Tensor:
        """Task t's slot for every image of the batch."""
        return torch.full((len(images),), task.index, dtype=torch.long, device=images.device)

    @torch.no_grad()
    def merge_slot(self, task_index: int) -> None:
        """Their post-training prompt momentum: slot t <- (1 - m) slot t + m mean(slots < t)."""
        momentum = self.options.prompt_momentum
        if task_index > 0 and momentum > 0:
            self.prompts[task_index] = (1 - momentum) * self.prompts[task_index] + momentum * self.prompts[:task_index].mean(0)

    def tii_alignment_config(self) -> AlignmentConfig:
        config = self.options.tii_alignment
        if config.samples_per_class is None:
            config = replace(config, samples_per_class=self.experiment.train.batch_size)
        return config

    def collect_statistics(self, context: TaskContext, statistics: GaussianClassStatistics, embed) -> None:
        task = context.task
        sums = ClassFeatureSums(task.low, task.high, self.backbone.num_features, statistics.storage)
        for images, labels in context.statistics_loader():
            sums.add(embed(images.to(context.device)), labels)
        sums.reduce_(context.distributed)
        sums.store_into(statistics)

    def align(self, context: TaskContext, statistics: GaussianClassStatistics, trained: nn.Module, forward,
              config: AlignmentConfig, label: str) -> None:
        task = context.task
        steps = task.low if self.options.alignment_steps == "old_classes" else task.high
        self.align_head(trained, statistics, config, context, f"{self.options.name}/{label}", steps_per_epoch=steps,
                        logits=lambda features: forward(features)[:, : task.high])

    # ---- inference and state -------------------------------------------------------------------
    def task_slots(self, images: Tensor) -> Tensor:
        """The TII's task for each image (majority of the batch with `batchwise_selection`)."""
        task_of = torch.as_tensor(self.scenario.task_of_class()[: self.n_seen_classes], device=images.device).long()
        slots = task_of[self.tii_logits(self.query(images))[:, : self.n_seen_classes].argmax(1)]
        if self.options.batchwise_selection:
            slots = majority_slots(slots[:, None], 1)[0].expand(len(images))
        return slots

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        features = self.features_with_slots(images, None, self.task_slots(images))
        return self.head(features)[:, : self.n_seen_classes]

    def saved_states(self) -> dict[str, StateHolder]:
        return {"statistics": self.statistics, "tii_statistics": self.tii_statistics}
