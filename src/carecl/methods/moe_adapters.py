"""MoE-Adapters4CL ("Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters",
Yu et al., CVPR 2024; code JiazuoYu/MoE-Adapters4CL) on a frozen CLIP (`backbone.family: open_clip`).

Every block of both towers gets a bank of bottleneck adapters mixed by a noisy top-k router on the
block's token 0 (`tuners/moe_adapter.py`). Classification is CLIP's: exp(logit_scale) x the cosine of the
image embedding with the text embeddings of class prompts. Each task trains the adapters and routers
by cross-entropy over the task's own classes (targets made local), AdamW with a fresh optimiser per
task, per-step warm-up then cosine.

Two regimes, as the authors' two folders:
- class-incremental (`cil/`): one router, 2 experts, nothing frozen; the test head is every seen class.
- multi-domain task-incremental (`mtil/`, `routers: per_task`): a router per task over a shared pool
  of experts, the `freeze_top_experts` most-used experts of every block frozen after each task
  (activate-freeze), and DDAS (`ddas:`; per-task autoencoders) choosing the router, or the frozen
  CLIP, for each test batch; every test image is scored within its own task's classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.clip_backbone import tokenize
from carecl.config import ConfigError, ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, ParameterGroup, Phase, StepOutput, TaskContext, register_method
from carecl.methods.ddas import DDAS_PHASE, DDASConfig, DistributionSelector, build_features
from carecl.preprocessing import input_size, run_transforms
from carecl.scenario import Scenario, Task
from carecl.tuners.moe_adapter import MoEAdapterConfig, MoEAdapterInjector

EXPERTS_PHASE = "experts"
# Text prompts encoded per forward of the text tower (keeps memory flat for hundreds of classes).
TEXT_BATCH = 256


@dataclass
class MoEAdaptersConfig(MethodConfig):
    name: str = "moe_adapters"
    # Every block's expert bank in both towers: experts, how many each sample mixes (top_k) and the expert
    # shape (their hard-coded bottleneck 64, scale 0.1, dropout 0.1), router noise.
    moe: MoEAdapterConfig = field(default_factory=MoEAdapterConfig)
    # shared: one router for every task (CIL); per_task: a router per task, chosen at test time by DDAS (MTIL).
    routers: Literal["shared", "per_task"] = "shared"
    # Activate-freeze: after each task freeze each block's n most-used experts (MTIL: 2; 0 = never).
    freeze_top_experts: int = 0
    # Training prompts (one template) and the test head's templates, averaged (null: the training template).
    template: str = "a bad photo of a {}."
    test_templates: list[str] | None = None
    label_smoothing: float = 0.0
    # Optimiser steps per task (MTIL: 1000); null: `train.epochs` passes over the task's data (CIL: 1).
    steps_per_task: int | None = None
    # A multi-domain member's own learning rate, by member name (MTIL's per-dataset lr); others: train.lr.
    domain_lr: dict[str, float] | None = None
    warmup_steps: int = 30
    # The authors' CIL keeps the router noise on at evaluation; off by default (predictions are then deterministic).
    eval_noise: bool = False
    # DDAS: per-task autoencoders route each test batch (null: no selector; needs routers: shared).
    ddas: DDASConfig | None = None

    moved_keys = {"experts": "moe.experts", "top_k": "moe.top_k", "bottleneck": "moe.bottleneck",
                  "adapter_scale": "moe.scale", "adapter_dropout": "moe.dropout"}

    def validate(self) -> None:
        require(0 <= self.freeze_top_experts <= self.moe.experts, "freeze_top_experts",
                f"must be in 0..moe.experts ({self.moe.experts}), got {self.freeze_top_experts}")
        require("{}" in self.template, "template", f"needs a {{}} for the class name, got {self.template!r}")
        for template in self.test_templates or []:
            require("{}" in template, "test_templates", f"each needs a {{}} for the class name, got {template!r}")
        require(self.steps_per_task is None or self.steps_per_task > 0, "steps_per_task",
                f"must be positive or null, got {self.steps_per_task}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        for member, lr in (self.domain_lr or {}).items():
            require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, "domain_lr",
                    f"{member}: must be a positive number, got {lr!r}")
        require(self.routers == "shared" or self.ddas is not None, "ddas",
                "is needed with routers: per_task (it picks each test batch's router)")


def text_tower(clip: nn.Module) -> nn.Module:
    """The module holding the text transformer: open_clip's CLIP itself, or CustomTextCLIP's `text`."""
    return clip.text if hasattr(clip, "text") else clip


@register_method("moe_adapters", MoEAdaptersConfig, "moe_adapter4cl")
class MoEAdapters(Method):
    options: MoEAdaptersConfig

    scores_unseen_tasks = True

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        if not hasattr(backbone, "encode_text"):
            raise ConfigError("backbone.family: moe_adapters needs a CLIP backbone: set backbone.family: open_clip "
                              "(its classifier is the text tower; configs/moe_adapters/ has CLIP configs)")
        self.clip = backbone
        options = self.options
        unknown = sorted(set(options.domain_lr or {}) - set(scenario.task_names))
        if unknown and scenario.task_names:
            raise ConfigError(f"method.domain_lr names no member of the stream: {unknown} "
                              f"(members: {', '.join(scenario.task_names)})")
        self.image_moe = MoEAdapterInjector(backbone.visual, options.moe)
        self.text_moe = MoEAdapterInjector(text_tower(backbone), options.moe)
        self.selector = None
        if options.ddas is not None:
            features = build_features(options.ddas, backbone, self.image_moe)
            self.selector = DistributionSelector(options.ddas, features, input_size(config))
        # Which phase the training steps belong to (0: DDAS autoencoder, 1: experts), saved for a mid-phase resume.
        self.register_buffer("phase_index", torch.ones((), dtype=torch.long))
        self._text_cache: dict[tuple, Tensor] = {}

    @property
    def injectors(self) -> tuple[MoEAdapterInjector, MoEAdapterInjector]:
        return self.image_moe, self.text_moe

    def backbone_modules(self) -> list[nn.Module]:
        return [self.clip, *([self.selector.features] if self.selector is not None else [])]

    # ---- growth ------------------------------------------------------------------------
    def router_for(self, task: Task) -> int:
        return task.index if self.options.routers == "per_task" else 0

    def begin_task(self, task: Task) -> None:
        for injector in self.injectors:
            while injector.n_routers <= self.router_for(task):
                injector.add_router()
            for index in range(injector.n_routers):
                for parameter in injector.router_parameters(index):
                    parameter.requires_grad_(index == self.router_for(task))
            injector.apply_frozen()
            injector.reset_usage()
        if self.selector is not None:
            self.selector.begin_task(task)
        self._text_cache.clear()

    # ---- training ----------------------------------------------------------------------
    def training_phases(self, task: Task) -> list[Phase]:
        options, train = self.options, self.experiment.train
        phases = self.selector.phases() if self.selector is not None else []
        steps = options.steps_per_task
        lr = float((options.domain_lr or {}).get(self.scenario.task_name(task.index), train.lr))
        if steps is not None or train.epochs > 0:
            phases.append(Phase(EXPERTS_PHASE, train.epochs, lr, 0.0, train.epochs, schedule="warmup_cosine",
                                steps=steps, warmup_steps=options.warmup_steps))
        return phases

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        if phase.name == DDAS_PHASE:
            return self.selector.parameter_groups()
        trainable = [p for injector in self.injectors for p in injector.banks.parameters() if p.requires_grad]
        return [ParameterGroup(trainable)]

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        self.phase_index.fill_(0 if phase.name == DDAS_PHASE else 1)
        if phase.name == DDAS_PHASE:
            config = self.experiment
            self.selector.begin_phase(context, run_transforms(config).train, config.train.batch_size, config.seed)

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        if int(self.phase_index) == 0:
            loss = self.selector.training_loss(images)
            return StepOutput(loss, {"autoencoder": loss.item()})
        self.set_route(self.router_for(task), noisy=True, counting=True)
        text = self.class_text_features(task, self.training_templates(task))
        logits = self.logit_scale * self.image_features(images) @ text.t()
        loss = F.cross_entropy(logits, targets - task.low, label_smoothing=self.options.label_smoothing)
        return StepOutput(loss)

    def end_task(self, context: TaskContext) -> None:
        for injector in self.injectors:
            injector.counting = False
            if self.options.freeze_top_experts:
                injector.freeze_most_used(self.options.freeze_top_experts)
        self._text_cache.clear()

    # ---- the two towers ----------------------------------------------------------------
    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def set_route(self, route: int | None, noisy: bool, counting: bool = False) -> None:
        for injector in self.injectors:
            injector.route, injector.noisy, injector.counting = route, noisy, counting

    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def class_text_features(self, task: Task, templates: list[str]) -> Tensor:
        """(classes of `task`, D): per class, the normalised mean over `templates` of its normalised prompt embeddings."""
        names = self.scenario.names(task.low, task.high)
        device = self.clip.logit_scale.device
        per_template = []
        for template in templates:
            tokens = tokenize(self.clip, [template.format(name) for name in names]).to(device)
            encoded = torch.cat([self.clip.encode_text(chunk) for chunk in tokens.split(TEXT_BATCH)])
            per_template.append(F.normalize(encoded, dim=-1))
        mean = torch.stack(per_template).mean(dim=0)
        return F.normalize(mean, dim=-1) if len(templates) > 1 else mean

    # ---- prompts -----------------------------------------------------------------------
    def domain_templates(self, task: Task) -> list[str] | None:
        """A multi-domain member's own templates (None for class-incremental heads and plain tasks)."""
        own = self.scenario.templates(task.index) if task.index >= 0 else None
        return list(own) if own else None

    def training_templates(self, task: Task) -> list[str]:
        """A domain's first template (the authors' MTIL), else `template`."""
        own = self.domain_templates(task)
        return own[:1] if own else [self.options.template]

    def test_templates(self, task: Task) -> list[str]:
        """A domain's templates (averaged, MTIL), else `test_templates`, else `template`."""
        return self.domain_templates(task) or list(self.options.test_templates or [self.options.template])

    # ---- prediction --------------------------------------------------------------------
    def text_head(self, task: Task, route: int | None) -> Tensor:
        """The task's class embeddings under `route`, cached while the router noise is off at evaluation."""
        noisy = self.options.eval_noise and route is not None
        key = (task.low, task.high, route)
        if noisy or key not in self._text_cache:
            self.set_route(route, noisy)
            head = self.class_text_features(task, self.test_templates(task))
            if noisy:
                return head
            self._text_cache[key] = head
        return self._text_cache[key]

    def scores(self, images: Tensor, task: Task, route: int | None) -> Tensor:
        head = self.text_head(task, route)
        self.set_route(route, self.options.eval_noise and route is not None)
        return self.logit_scale * self.image_features(images) @ head.t()

    def selected_route(self, chosen: int | None) -> int | None:
        """The router of the task DDAS chose (the shared one when routers are shared), None for the frozen CLIP."""
        return None if chosen is None else self.router_for(Task(chosen, 0, 0))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Every seen class, one head (class-incremental): the shared router, or DDAS's choice per batch."""
        seen = Task(-1, 0, self.n_seen_classes)
        route = self.selected_route(self.selector.route(images)) if self.selector is not None else 0
        return self.scores(images, seen, route)

    @torch.no_grad()
    def predict_in_task(self, images: Tensor, task: Task) -> Tensor:
        """Scores over `task`'s own classes (MTIL): DDAS picks the router, or the frozen CLIP, for the batch
        (`ddas.decision: sample`: for each image)."""
        if self.selector is None:
            return self.scores(images, task, 0)
        if self.options.ddas.decision == "batch":
            return self.scores(images, task, self.selected_route(self.selector.route(images)))
        routes = [self.selected_route(route) for route in self.selector.routes(images)]
        out = torch.empty(len(images), task.size, device=images.device)
        for route in set(routes):
            rows = torch.tensor([i for i, r in enumerate(routes) if r == route], device=images.device)
            out[rows] = self.scores(images[rows], task, route).float()
        return out

    # ---- state -------------------------------------------------------------------------
    def load_state_tensors(self, tensors: dict[str, Tensor], grow: bool = False) -> None:
        super().load_state_tensors(tensors, grow)
        for injector in self.injectors:
            injector.apply_frozen()
        self._text_cache.clear()
