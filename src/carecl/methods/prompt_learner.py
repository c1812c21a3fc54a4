"""What the prompt learners (L2P, DualPrompt, CODA-Prompt) share, as LAMDA-PILOT runs them: a frozen ViT,
a query from the frozen ViT's own CLS pass, a linear head over every class of the stream (timm's init),
trained with CE over the current task's classes only (the authors mask earlier classes with -inf and
slice off later ones), one optimiser per task on a constant or cosine schedule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.classifiers import linear_head
from carecl.config import ConfigError, ExperimentConfig, MethodConfig
from carecl.methods.base import Method, Phase
from carecl.scenario import Scenario, Task
from carecl.tuners.base import Injector
from carecl.tuners.prefix import Prefix
from carecl.tuners.prompt_pool import frozen_query


@dataclass
class PromptScheduleOptions(MethodConfig):
    # PILOT's `scheduler`: "constant" keeps train.lr for every epoch; "cosine" decays to train.min_lr;
    # "coda_cosine": CODA-Prompt's own cosine (engine/optim.py).
    schedule: Literal["constant", "cosine", "coda_cosine"] = "constant"


def prompted_blocks(chosen: list[int] | None, default: list[int], depth: int, key: str) -> list[int]:
    """The blocks a prompt learner prefixes: `chosen` (each must exist), or its published `default` cut to the
    ViT's depth (a 2-block test ViT gets blocks 0 and 1)."""
    if chosen is None:
        return [block for block in default if block < depth]
    missing = [block for block in chosen if not 0 <= block < depth]
    if missing:
        raise ConfigError(f"method.{key}: blocks {missing} do not exist (the ViT has {depth} blocks)")
    return list(chosen)


def reshape_quirk(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """DualPrompt's PyTorch port (and HiDe-Prompt / NoRGa after it) lays the chosen prefixes out (2, B, ...) and
    *reshapes* them to (B, 2, ...): image b's key and value are entries 2b and 2b + 1 of that layout."""
    mixed = torch.stack([keys, values]).reshape(keys.shape[0], 2, *keys.shape[1:])
    return mixed[:, 0], mixed[:, 1]


def slot_prefixes(prompts: Tensor, blocks: list[int], kv_reshape_quirk: bool) -> dict[int, Prefix]:
    """Per block, the prefix of each image's slot prompts (B, blocks, 2, length, C), reshaped as the authors'
    code does when `kv_reshape_quirk`."""
    per_block = {}
    for index, block in enumerate(blocks):
        keys, values = prompts[:, index, 0], prompts[:, index, 1]
        if kv_reshape_quirk:
            keys, values = reshape_quirk(keys, values)
        per_block[block] = Prefix(keys, values)
    return per_block


class PromptLearner(Method):
    """Subclasses set `self.injectors` (bypassed for the query) and implement `prompted_features`."""

    options: PromptScheduleOptions

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        self.backbone = backbone
        self.head = self.build_head(backbone.num_features, int(scenario.boundaries[-1]))
        self.injectors: list[Injector] = []

    def build_head(self, width: int, n_classes: int) -> nn.Linear:
        """A linear head over every class of the stream, drawn from its own random stream: sized to more classes
        (classes learned after the stream), it leaves every other initialisation as it was and its first rows too."""
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own initialisation draws too
            return linear_head(width, n_classes, torch.Generator().manual_seed(self.experiment.seed))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        if train.epochs == 0:
            return []
        schedule = self.options.schedule
        min_lr = train.lr if schedule == "constant" else train.min_lr
        # A constant schedule is a cosine from lr to lr.
        return [Phase("prompts", train.epochs, train.lr, min_lr, train.epochs,
                      schedule="coda_cosine" if schedule == "coda_cosine" else "cosine")]

    def query(self, images: Tensor) -> Tensor:
        """The frozen ViT's pooled CLS feature (every injector stands aside)."""
        with contextlib.ExitStack() as stack:
            for injector in self.injectors:
                stack.enter_context(injector.bypassed())
            return frozen_query(self.backbone, images)

    def prompted_features(self, images: Tensor, task: Task | None) -> tuple[Tensor, Tensor]:
        """(features for the head, pull term of the key matching); `task` is the training task, None at test."""
        raise NotImplementedError

    def current_task_loss(self, features: Tensor, targets: Tensor, task: Task) -> Tensor:
        return F.cross_entropy(self.head(features)[:, task.low: task.high], targets - task.low)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.head(self.prompted_features(images, None)[0])[:, : self.n_seen_classes]
