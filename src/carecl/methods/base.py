"""The method interface: a small class with hooks that the one training loop calls.

Adding a method (one new file, `carecl/methods/<name>.py`, and a YAML; nothing else to edit):

1. Options: a torch-free `@dataclass class MyOptions(MethodConfig)` with `name: str = "my_method"`
   and typed fields; ranges and cross-field rules go in `validate()` (use `config.require`), closed
   choices are `Literal`s. YAML `method:` sections are checked against it.
2. The learner: `@register_method("my_method", MyOptions) class MyMethod(Method)`; the constructor
   receives the experiment config (`self.options` is your MyOptions), the frozen backbone and the
   scenario. Wrap the backbone with an injector from `carecl.tuners` rather than editing it.
3. Hooks, each optional (call order per task below): `begin_task` grows what the task needs and
   must be deterministic (a saved run is rebuilt by replaying it before its weights load);
   `training_phases` (none for closed-form methods); `parameter_groups` (lr multiplier and weight
   decay per group); `training_loss`; `after_optimizer_step` (in-place updates outside the gradient,
   MOS's adapter merge); `after_epoch` (MoAL's moving average); `begin_phase` / `end_phase`;
   `end_task`; `predict` returns scores over the seen classes (`predict_in_task` over one task's,
   for task-incremental evaluation); `class_probabilities` when a softmax of those scores is not a
   calibrated probability.
4. State: everything learned must come back from `state_tensors()`: module weights and buffers
   are included by default, and state kept outside the module (class statistics, CaRE's anchor) is
   listed by prefix in `saved_states()`. The frozen backbone is listed in `backbone_modules()` and
   never saved. Shared steps live here too: `align_head` (classifier alignment on the class
   Gaussians, private RNG stream) and `Phase.from_train` (a phase of the `train:` settings).
5. Resume contract: a mid-phase checkpoint holds `state_tensors()`, the optimiser and the RNGs;
   on resume `begin_phase` is NOT called again. Whatever `begin_phase` prepares that later
   training steps read (CaRE: the shared-adapter anchor) must therefore be in `state_tensors()`.
6. Test: a 3-task run on shipped data, plus a test that fails if the method's core step breaks.

Call order for each task: begin_task -> for each phase: begin_phase, [training_loss, after_optimizer_step ...], end_phase
-> end_task (then the method counts the task as learned) -> predict / class_probabilities.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

from carecl.alignment import align_classifier
from carecl.alignment_config import AlignmentConfig
from carecl.config import ExperimentConfig, MethodConfig, TrainConfig
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.registry import METHODS, MethodEntry
from carecl.scenario import Scenario, Task
from carecl.statistics import GaussianClassStatistics

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


def cosine_lr(base_lr: float, min_lr: float, period: int, epoch: int) -> float:
    """Learning rate of CosineAnnealingLR(T_max=period, eta_min=min_lr) after `epoch` steps."""
    if period <= 0:
        return base_lr
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / period)) / 2


@dataclass(frozen=True)
class Phase:
    """A stretch of training with a fresh optimiser and one schedule, stepped per epoch.

    By default a cosine of period `schedule_epochs` (a phase may stop before the period ends); with
    `milestones`, the lr is multiplied by `lr_decay` at each of those epochs instead (MultiStepLR);
    `schedule="coda_cosine"`: lr x cos(99π·epoch / (200·(schedule_epochs - 1))), CODA-Prompt's own
    schedule (it never reaches zero and ignores `min_lr`); `schedule="warmup_cosine"`: stepped per
    optimiser step, linear warm-up over `warmup_steps` then a cosine to 0 at the phase's last step
    (MoE-Adapters4CL); `schedule="constant"`: lr throughout.

    `steps`: the phase is that many optimiser steps, the loader restarted (a new shuffle) whenever it
    runs out, instead of `epochs` passes (a fixed-step phase counts as one epoch for checkpoints).
    `optimizer`: this phase's optimiser instead of `train.optimizer` (MoE-Adapters4CL's autoencoders: Adam).
    """

    name: str
    epochs: int
    lr: float
    min_lr: float
    schedule_epochs: int
    milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    schedule: str = "cosine"
    steps: int | None = None
    warmup_steps: int = 0
    optimizer: str | None = None

    @property
    def final_lr(self) -> float:
        return cosine_lr(self.lr, self.min_lr, self.schedule_epochs, self.epochs)

    @classmethod
    def from_train(cls, name: str, train: TrainConfig, *, epochs: int | None = None, lr: float | None = None,
                   **options: Any) -> "Phase":
        """`epochs` (train.epochs) on a cosine from `lr` (train.lr) to train.min_lr over exactly those epochs."""
        epochs = train.epochs if epochs is None else epochs
        return cls(name, epochs, train.lr if lr is None else lr, train.min_lr, epochs, **options)


class StateHolder(Protocol):
    """State saved beside a method's module tensors (see `Method.saved_states`)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class StateAccess:
    """A StateHolder made of two functions, for state a module keeps apart (CaRE's anchor)."""

    state_dict: Callable[[], dict[str, torch.Tensor]]
    load_state_dict: Callable[[dict[str, torch.Tensor]], None]


@dataclass
class ParameterGroup:
    """Parameters trained together: lr = phase lr x `lr_scale`; weight decay None = train.weight_decay."""

    parameters: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None
    name: str = "trainable"


@dataclass
class StepOutput:
    """A training step's loss and the scalars worth logging."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskContext:
    """What the engine hands to end-of-phase / end-of-task hooks."""

    task: Task
    scenario: Scenario
    device: torch.device
    # Loader over the current task's training images with *test* transforms (class statistics).
    statistics_loader: Callable[[], "DataLoader"]
    progress: bool = False
    # Under torchrun the statistics loader yields this rank's shard: reduce sums over ranks with it.
    distributed: Distributed = SINGLE_PROCESS

    # Loader whose batches each hold one class, class by class, at most n images (PILOT's per-class loops).
    class_batch_loader: Callable[[int], "DataLoader"] | None = None
    # Loader over the task's training images with *training* transforms, shuffled by a pass number, in batches
    # of n (SEMA's detection).
    augmented_loader: Callable[[int, int], "DataLoader"] | None = None

    def training_batches(self, batch_size: int, pass_number: int, purpose: str) -> "DataLoader":
        """The task's augmented training images in batches of `batch_size`, shuffled by `pass_number` (the same
        pass number gives the same order, so a resumed run repeats it), in one process."""
        if self.distributed.enabled or self.augmented_loader is None:
            raise NotImplementedError(f"{purpose} in a single process")
        return self.augmented_loader(batch_size, pass_number)

    def class_batches(self, batch_size: int, purpose: str) -> "DataLoader":
        """The task's training images (test transforms) class by class in batches that never mix classes."""
        if self.distributed.enabled or self.class_batch_loader is None:
            raise NotImplementedError(f"{purpose} in a single process (it reads the task class by class)")
        return self.class_batch_loader(batch_size)

    @torch.no_grad()
    def embed_task_images(self, embed: Callable[[torch.Tensor], torch.Tensor], purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, class positions) of every training image of the task (test transforms, loader order),
        in one process: `purpose` names what needs them all, for the error under torchrun."""
        if self.distributed.enabled:
            raise NotImplementedError(f"{purpose} in a single process")
        features, labels = [], []
        for images, targets in self.statistics_loader():
            features.append(embed(images.to(self.device)).float())
            labels.append(targets.to(self.device))
        return torch.cat(features), torch.cat(labels)


class Method(nn.Module):
    """Base class of continual learners; subclasses override the hooks they need (module docstring)."""

    # A subclass re-annotates this with its own options class (e.g. `options: CareConfig`).
    options: MethodConfig
    # Why the method cannot learn tasks after those of its configured stream (carecl learn refuses it); None: it can,
    # whatever it sized to the stream growing when a saved learner is loaded into a longer one (load_state_tensors).
    cannot_learn_beyond_its_stream: str | None = None

    # Can score the classes of tasks not learned yet (a CLIP text head: eval.unseen_tasks, zero-shot transfer).
    scores_unseen_tasks = False
    # A class's score on an image never changes once the class is learned (frozen features, a score per class
    # from that class's own statistics): evaluation then scores only new classes on stored features
    # (`eval_features`, `scores_from_features`; engine/incremental_eval.py).
    fixed_class_scores = False

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__()
        self.experiment = config
        self.options = config.method
        self.scenario = scenario
        self._n_learned_tasks = 0

    # ---- progress (owned here: the engine only reports a finished task) -----------------
    @property
    def n_learned_tasks(self) -> int:
        return self._n_learned_tasks

    @property
    def n_seen_classes(self) -> int:
        return int(self.scenario.boundaries[self._n_learned_tasks])

    def finish_task(self, context: TaskContext) -> None:
        """end_task, then count the task as learned (the engine's call after a task's phases)."""
        self.end_task(context)
        self._n_learned_tasks = context.task.index + 1

    def regrow(self, grown_tasks: int, learned_tasks: int) -> None:
        """Replay begin_task for the first `grown_tasks` tasks of a saved learner (before its state loads)."""
        for task in self.scenario.tasks()[:grown_tasks]:
            self.begin_task(task)
        self._n_learned_tasks = learned_tasks

    # ---- state -------------------------------------------------------------------------
    def backbone_modules(self) -> list[nn.Module]:
        """Frozen modules rebuilt from the config rather than saved with each checkpoint."""
        return []

    def module_state_tensors(self) -> dict[str, torch.Tensor]:
        """The module's weights and buffers except the frozen backbone."""
        frozen = {id(t) for module in self.backbone_modules() for t in [*module.parameters(), *module.buffers()]}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) not in frozen}

    def saved_states(self) -> dict[str, StateHolder]:
        """State kept outside the module's weights and buffers, saved under `<prefix>.` keys (class statistics)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned (weights, buffers, `saved_states`) except the frozen backbone."""
        tensors = self.module_state_tensors()
        for prefix, holder in self.saved_states().items():
            tensors.update({f"{prefix}.{key}": value for key, value in holder.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], grow: bool = False) -> None:
        """Load `state_tensors()`; with `grow` (a learner saved before classes were added after its stream), a tensor
        now larger along one dimension keeps its new values beyond the saved ones (heads over every class, ...)."""
        tensors, parts = dict(tensors), {}
        for prefix in self.saved_states():
            parts[prefix] = {key[len(prefix) + 1:]: tensors.pop(key) for key in list(tensors)
                             if key.startswith(prefix + ".")}
        if grow:
            tensors = grown_into(tensors, self.module_state_tensors())
        expected = set(self.module_state_tensors())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise KeyError(f"saved learner state does not fit: missing {missing[:10]}, unexpected {unexpected[:10]}")
        self.load_state_dict(tensors, strict=False)
        for prefix, holder in self.saved_states().items():
            holder.load_state_dict(parts[prefix])

    # ---- shared steps --------------------------------------------------------------------
    def align_head(self, head: nn.Module, statistics: GaussianClassStatistics, config: AlignmentConfig, context: TaskContext, stream: str,
                   **options: Any) -> list[float]:
        """Classifier alignment of `head` over the seen classes on their Gaussians (alignment.py), its samples drawn
        from a private RNG stream named by seed, task and `stream` (training's RNG is never disturbed); every
        parameter of `head` trains and gets its requires_grad back afterwards. `options`: align_classifier's
        (scale, logits, steps_per_epoch)."""
        task = context.task
        seed = zlib.crc32(f"{self.experiment.seed}/{task.index}/{stream}".encode())
        trainable = [parameter.requires_grad for parameter in head.parameters()]
        head.requires_grad_(True)
        try:  # the head trains in fp32 whatever train.precision (which the statistics' forwards follow)
            with torch.enable_grad(), torch.autocast(context.device.type, enabled=False):
                return align_classifier(
                    head, statistics, config, n_seen_classes=task.high, batch_size=self.experiment.train.batch_size,
                    task_of_class=self.scenario.task_of_class()[: task.high], current_task=task.index,
                    current_task_size=task.size, generator=torch.Generator(device=context.device).manual_seed(seed),
                    device=context.device, progress=context.progress, **{"scale": 1.0, **options})
        finally:
            for parameter, flag in zip(head.parameters(), trainable):
                parameter.requires_grad_(flag)

    # ---- hooks -------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Grow whatever this task needs (experts, heads, ...)."""

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        if train.epochs == 0 or not self.trainable_parameters():
            return []
        return [Phase.from_train("train", train)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        """What the phase's optimiser trains, by group (default: every trainable parameter, lr x1); a phase whose
        groups are all empty is skipped (its begin_phase and end_phase still run)."""
        return [ParameterGroup(self.trainable_parameters())]

    def training_loss(self, images: torch.Tensor, targets: torch.Tensor, task: Task) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} does not train by gradient descent")

    def after_optimizer_step(self, task: Task) -> None:
        """Called after every optimiser step of a training phase (state it changes is checkpointed with the weights)."""

    def after_epoch(self, phase: Phase, epoch: int) -> None:
        """Called after every epoch of a training phase, before its checkpoint (MoAL's moving average of the adapters)."""

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        """Called when a training phase starts, never on a resume (see the resume contract above)."""

    def end_phase(self, phase: Phase, context: TaskContext) -> None:
        """Called after each training phase (CaRE: class statistics and alignment)."""

    def end_task(self, context: TaskContext) -> None:
        """Called once the task's training is over (prototypes, freezing, ...)."""

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (batch, n_seen_classes) over all classes seen so far."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen features `scores_from_features` scores (methods with fixed_class_scores)."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed class scores")

    @torch.no_grad()
    def scores_from_features(self, features: torch.Tensor, low: int, high: int) -> torch.Tensor:
        """Scores of classes [low, high) from `eval_features` (methods with fixed_class_scores)."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed class scores")

    @torch.no_grad()
    def predict_in_task(self, images: torch.Tensor, task: Task) -> torch.Tensor:
        """Scores (batch, task.size) over one task's classes (task-incremental evaluation): by default the
        columns of `predict` for a learned task."""
        if task.index >= self.n_learned_tasks:
            raise NotImplementedError(f"{type(self).__name__} cannot score task {task.index + 1} before learning it")
        return self.predict(images)[:, task.low:task.high]

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, n_seen_classes) probabilities, rows summing to 1: softmax of `predict` by default."""
        return self.predict(images).float().softmax(dim=1)


def grown_into(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each saved tensor placed at the start of its current, larger counterpart (larger along exactly one
    dimension); others as they are (a mismatch is then reported by the load)."""
    result = dict(saved)
    for key, value in saved.items():
        now = current.get(key)
        if now is None or now.shape == value.shape or now.dim() != value.dim():
            continue
        larger = [d for d in range(value.dim()) if now.shape[d] != value.shape[d]]
        if len(larger) == 1 and now.shape[larger[0]] > value.shape[larger[0]]:
            merged = now.detach().clone()
            merged.narrow(larger[0], 0, value.shape[larger[0]]).copy_(value)
            result[key] = merged
    return result


def register_method(name: str, options: type[MethodConfig], *aliases: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: the one registration of a method, giving its options class and its learner."""
    if not (isinstance(options, type) and issubclass(options, MethodConfig)):
        raise TypeError(f"register_method({name!r}): options must be a MethodConfig dataclass, got {options!r}")
    if options.name != name:
        raise ValueError(f"register_method({name!r}): {options.__name__}.name defaults to {options.name!r}, "
                         f"not {name!r}")

    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.add(name, MethodEntry(name, options, cls), *aliases)
        return cls

    return decorator


def build_method(config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> Method:
    return METHODS.get(config.method.name).method(config, backbone, scenario)
