"""SEMA ("Self-Expansion of Pre-trained Models with Mixture of Adapters for Continual Learning", Wang et al.,
CVPR 2025; code huiyiwang01's SEMA-CL, read at commit 5a45512 "code for SEMA"): a mixture of adapters that
grows only where the data ask for it (`tuners/sema.py`), and one linear head over every class.

The first task trains every block's first adapter, the routers and the head (cross-entropy, old classes'
logits masked), then the expandable blocks' representation descriptors (their reconstruction loss).
Each later task first looks for a distribution shift: a pass over the task's augmented training images
(the model in eval mode) in which the first block whose adapters all see a batch at mean z-score above
the threshold gets a new adapter, trained (adapter, its router column, the head) and then described
(its RD), everything else frozen. At most one adapter per expandable block per task: the look is repeated
after each expansion, up to once per expandable block. A task that expands nowhere trains the head only.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, ParameterGroup, Phase, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.tuners.sema import SEMAConfig, SEMAInjector

log = logging.getLogger("carecl")
ADAPTER_KEY = re.compile(r"^tuner\.layers\.(\d+)\.adapters\.(\d+)\.")


@dataclass
class SEMAOptions(MethodConfig):
    name: str = "sema"
    # The mixture of adapters (`tuners/sema.py`): the authors' ffn_num, rd_dim, buffer_size, exp_threshold,
    # adapt_start_layer / adapt_end_layer.
    sema: SEMAConfig = field(default_factory=SEMAConfig)
    # The descriptors' epochs and lr (rd_epoch, rd_lr); the adapters train train.epochs at train.lr (func_epoch, init_lr).
    rd_epochs: int = 20
    rd_lr: float = 0.01
    # Images per batch of the shift-detection pass (detect_batch_size).
    detect_batch_size: int = 128

    moved_keys = {key: f"sema.{key}" for key in ("bottleneck", "rd_dim", "buffer_size", "threshold",
                                                 "first_expandable", "last_expandable")}

    def validate(self) -> None:
        require(self.rd_epochs >= 0, "rd_epochs", f"must be >= 0, got {self.rd_epochs}")
        require(self.rd_lr > 0, "rd_lr", f"must be positive, got {self.rd_lr}")
        require(self.detect_batch_size > 0, "detect_batch_size", f"must be positive, got {self.detect_batch_size}")


# Phase kinds: adapters + routers + head ("func"), descriptors ("rd"), head alone.
ADAPTERS, DESCRIPTORS, HEAD = "adapters", "descriptors", "head only"


@register_method("sema", SEMAOptions)
class SEMA(Method):
    options: SEMAOptions

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.backbone = backbone
        self.tuner = SEMAInjector(backbone, self.options.sema)
        self.head = nn.Linear(backbone.num_features, scenario.n_classes)
        nn.init.kaiming_uniform_(self.head.weight, a=math.sqrt(5))
        nn.init.zeros_(self.head.bias)
        # The block that expanded for the current round (-1: none), whether the task expanded at all, how many
        # detection passes it made and whether the last one found a shift (after one that finds none, none follow).
        self.register_buffer("round_block", torch.full((), -1, dtype=torch.long))
        self.register_buffer("task_expanded", torch.zeros((), dtype=torch.bool))
        self.register_buffer("detections", torch.zeros((), dtype=torch.long))
        self.register_buffer("searching", torch.ones((), dtype=torch.bool))
        self.register_buffer("phase_kind", torch.zeros((), dtype=torch.long))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    @property
    def expandable_blocks(self) -> list[int]:
        return [index for index, layer in enumerate(self.tuner.layers) if layer.expandable]

    # ---- phases ------------------------------------------------------------------------
    def training_phases(self, task: Task) -> list[Phase]:
        train, options = self.experiment.train, self.options
        adapters = Phase.from_train(ADAPTERS, train)
        descriptors = Phase.from_train(DESCRIPTORS, train, epochs=options.rd_epochs, lr=options.rd_lr)
        if task.index == 0:
            return [adapters, descriptors]
        rounds = [phase for _ in self.expandable_blocks for phase in (adapters, descriptors)]
        return [*rounds, Phase.from_train(HEAD, train)]

    def begin_task(self, task: Task) -> None:
        self.task_expanded.fill_(task.index == 0)
        self.detections.zero_()
        self.searching.fill_(True)
        for layer in self.tuner.layers:
            layer.added_for_task.fill_(False)

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        self.phase_kind.fill_([ADAPTERS, DESCRIPTORS, HEAD].index(phase.name))
        if phase.name == ADAPTERS and context.task.index > 0:
            self.round_block.fill_(self.detect_shift(context) if bool(self.searching) else -1)
            self.searching.fill_(int(self.round_block) >= 0)
            if int(self.round_block) >= 0:
                self.task_expanded.fill_(True)
                layer = self.tuner.layers[int(self.round_block)]
                layer.add_adapter()
                layer.added_for_task.fill_(True)
                log.info("task %d: block %d finds the task's images out of distribution: adapter %d added",
                         context.task.index + 1, int(self.round_block) + 1, len(layer.adapters))
        elif phase.name == ADAPTERS:
            self.round_block.fill_(0)  # the first task trains every block's first adapter

    @torch.no_grad()
    def detect_shift(self, context: TaskContext) -> int:
        """The first block that finds a batch of the task's augmented images out of distribution, or -1."""
        was_training = self.training
        self.eval()
        self.tuner.detecting = True
        try:
            self.detections += 1
            batches = context.training_batches(self.options.detect_batch_size, int(self.detections), "SEMA's shift detection")
            for images, _ in batches:
                self.tuner.begin_forward()
                self.backbone.forward_features(images.to(context.device))
                if self.tuner.expansion is not None:
                    return self.tuner.expansion
            return -1
        finally:
            self.tuner.detecting = False
            self.train(was_training)

    def round_parameters(self, phase: Phase) -> list[nn.Parameter]:
        """What this phase trains (nothing in a round that found no shift, or in the head phase after one that did)."""
        if phase.name == HEAD:
            return [] if bool(self.task_expanded) else list(self.head.parameters())
        if int(self.round_block) < 0:
            return []
        first_task = self.n_learned_tasks == 0
        layers = list(self.tuner.layers) if first_task else [self.tuner.layers[int(self.round_block)]]
        newest = [layer.adapters[-1] for layer in layers]
        if phase.name == DESCRIPTORS:
            return [p for adapter in newest if adapter.rd is not None for p in adapter.rd.parameters()]
        return [p for adapter in newest for p in (*adapter.functional.parameters(), *adapter.gate.parameters())] + \
            list(self.head.parameters())

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        trained = self.round_parameters(phase)
        chosen = {id(p) for p in trained}
        for parameter in self.module_parameters():
            parameter.requires_grad_(id(parameter) in chosen)
        return [ParameterGroup(trained)]

    def module_parameters(self) -> list[nn.Parameter]:
        return [*self.tuner.layers.parameters(), *self.head.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.module_parameters()

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        self.tuner.begin_forward()
        logits = self.head(self.features(images))
        if int(self.phase_kind) == 1:
            return StepOutput(self.tuner.rd_loss, {"rd_loss": self.tuner.rd_loss.item()})
        logits = logits[:, :task.high].clone()
        logits[:, :task.low] = -float("inf")
        return StepOutput(F.cross_entropy(logits, targets))

    def end_phase(self, phase: Phase, context: TaskContext) -> None:
        if phase.name == DESCRIPTORS:
            self.tuner.settle()  # the round's adapter and RD are frozen: later rounds and tasks leave them

    def end_task(self, context: TaskContext) -> None:
        self.tuner.settle()
        self.round_block.fill_(-1)

    # ---- prediction --------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        self.tuner.begin_forward()
        return self.head(self.features(images))[:, :self.n_seen_classes]

    # ---- state: adapters added by detection are grown before a checkpoint loads ------------
    def load_state_tensors(self, tensors: dict[str, Tensor], grow: bool = False) -> None:
        counts: dict[int, int] = {}
        for key in tensors:
            match = ADAPTER_KEY.match(key)
            if match:
                block, index = int(match.group(1)), int(match.group(2))
                counts[block] = max(counts.get(block, 0), index + 1)
        for block, count in counts.items():
            while len(self.tuner.layers[block].adapters) < count:
                self.tuner.layers[block].add_adapter()
        super().load_state_tensors(tensors, grow)
