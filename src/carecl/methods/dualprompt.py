"""DualPrompt ("DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning", Wang et al., ECCV
2022), as LAMDA-PILOT runs it (a port of JH-LEE-KR/dualprompt-pytorch): prefix tuning in the first blocks.
A G(eneral)-prompt, shared by every task, gives prefix keys and values to blocks `g_layers`; an E(xpert)-
prompt pool gives them to blocks `e_layers`, one slot per task. Training uses the task's own slot (and
pulls its key towards the queries); at test the query (the frozen ViT's CLS feature) picks the slot by key
matching. The head reads the CLS token. Each new task's slot starts as a copy of the previous one.

Two behaviours of the authors' code are kept by default, each behind an option:
- `batchwise_selection`: at test, the slot chosen most often in the batch serves every image of it;
- `kv_reshape_quirk`: the selected prefixes, laid out (2, batch, ...), are reshaped rather than permuted to
  (batch, 2, ...), so image b gets entries 2b and 2b + 1 of that layout as its key and value prefixes (the
  first half of the batch gets key prefixes in both roles, the second half value prefixes). Training and
  test both do it, and at test an image's prefixes depend on its neighbours' selected slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from carecl.config import ExperimentConfig, require
from carecl.methods.base import StepOutput, register_method
from carecl.methods.prompt_learner import PromptLearner, PromptScheduleOptions, prompted_blocks, slot_prefixes
from carecl.scenario import Scenario, Task
from carecl.tuners.prefix import Prefix, PrefixInjector
from carecl.tuners.prompt_pool import PromptPool


@dataclass
class DualPromptConfig(PromptScheduleOptions):
    name: str = "dualprompt"
    # G-prompt and E-prompt blocks; null = blocks 0-1 and 2-4 (on a ViT of under 3 blocks: its last block for
    # the E-prompt, the ones before for the G-prompt).
    g_layers: list[int] | None = None
    g_length: int = 5
    e_layers: list[int] | None = None
    e_length: int = 5
    pool_size: int = 10
    batchwise_selection: bool = True
    kv_reshape_quirk: bool = True
    # Start task t's slot from slot t - 1 (`shared_prompt_pool`).
    copy_previous_slot: bool = True
    pull_weight: float = 0.1

    def validate(self) -> None:
        require(not set(self.g_layers or []) & set(self.e_layers or []), "e_layers",
                f"must not share blocks with g_layers {self.g_layers}, got {self.e_layers}")
        require(self.g_length > 0, "g_length", f"must be positive, got {self.g_length}")
        require(self.e_length > 0, "e_length", f"must be positive, got {self.e_length}")
        require(self.pool_size > 0, "pool_size", f"must be positive, got {self.pool_size}")
        require(self.pull_weight >= 0, "pull_weight", f"must be >= 0, got {self.pull_weight}")


def dual_blocks(options: DualPromptConfig, depth: int) -> tuple[list[int], list[int]]:
    """(G-prompt blocks, E-prompt blocks) for a ViT of `depth` blocks."""
    e_layers = prompted_blocks(options.e_layers, [2, 3, 4], depth, "e_layers") or [depth - 1]
    g_layers = prompted_blocks(options.g_layers, [0, 1], depth, "g_layers")
    if options.g_layers is None:
        g_layers = [block for block in g_layers if block not in e_layers]
    return g_layers, e_layers


@register_method("dualprompt", DualPromptConfig)
class DualPrompt(PromptLearner):
    options: DualPromptConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options, width = self.options, backbone.num_features
        self.g_layers, self.e_layers = dual_blocks(options, len(backbone.blocks))
        self.prefixes = PrefixInjector(backbone, sorted([*self.g_layers, *self.e_layers]))
        self.injectors = [self.prefixes]
        # (layers, key/value, length, C), U(-1, 1) as the authors'.
        self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), 2, options.g_length, width).uniform_(-1, 1))
        self.pool = PromptPool(options.pool_size, (len(self.e_layers), 2, options.e_length, width), width, 1,
                               options.batchwise_selection)

    def begin_task(self, task: Task) -> None:
        if self.options.copy_previous_slot and 0 < task.index < self.pool.size:
            with torch.no_grad():
                self.pool.prompts[task.index] = self.pool.prompts[task.index - 1]

    def task_slot(self, task: Task, batch: int, device: torch.device) -> Tensor | None:
        """Training uses the task's own slot while the pool has one (the authors' prompt mask)."""
        if task.index >= self.pool.size:
            return None
        return torch.full((batch, 1), task.index, dtype=torch.long, device=device)

    def prompted_features(self, images: Tensor, task: Task | None) -> tuple[Tensor, Tensor]:
        forced = None if task is None else self.task_slot(task, len(images), images.device)
        selection = self.pool.select(self.query(images), forced)
        chosen = self.pool.gather(selection.indices)[:, 0]  # (B, layers, 2, length, C)
        per_block = slot_prefixes(chosen, self.e_layers, self.options.kv_reshape_quirk)
        for index, layer in enumerate(self.g_layers):
            keys, values = self.g_prompt[index].unsqueeze(1).expand(-1, len(images), -1, -1)
            per_block[layer] = Prefix(keys, values)
        with self.prefixes.prefixes(per_block):
            features = self.backbone(images)
        return features, selection.pull

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        features, pull = self.prompted_features(images, task)
        classification = self.current_task_loss(features, targets, task)
        loss = classification - self.options.pull_weight * pull
        return StepOutput(loss, {"loss": loss.item(), "pull": pull.item()})
