"""L2P ("Learning to Prompt for Continual Learning", Wang et al., CVPR 2022), as LAMDA-PILOT runs it (the CaRE
tables' source; PILOT ports JH-LEE-KR/l2p-pytorch): a pool of prompts shared by all tasks, each with a key.
An image's query (the frozen ViT's CLS feature) picks the top-N keys; their prompts (N x length tokens) are
prepended to the patch tokens, and the head reads the mean of the prompt tokens' outputs. Loss: CE over
the current task's classes minus `pull_weight` x the summed query-key cosine of the chosen keys (the
surrogate loss that pulls chosen keys towards their queries). With `batchwise_selection` (the authors'
default) the N slots chosen most often in a batch serve every image of it, in training and at test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from carecl.config import ExperimentConfig, require
from carecl.methods.base import StepOutput, register_method
from carecl.methods.prompt_learner import PromptLearner, PromptScheduleOptions
from carecl.scenario import Scenario, Task
from carecl.tuners.prompt_pool import PromptPool
from carecl.tuners.prompt_tokens import PromptTokenInjector


@dataclass
class L2PConfig(PromptScheduleOptions):
    name: str = "l2p"
    pool_size: int = 10
    prompt_length: int = 5
    # N, the prompts chosen per image (`top_k`).
    top_k: int = 5
    # The authors' majority vote over the batch (`batchwise_prompt`); false: each image its own slots.
    batchwise_selection: bool = True
    # Weight of the key pull term (`pull_constraint_coeff`).
    pull_weight: float = 0.1
    # What the head reads (`head_type`): the mean of the prompt tokens' outputs ("prompt") or the CLS token.
    head_input: Literal["prompts", "cls"] = "prompts"

    def validate(self) -> None:
        require(self.pool_size > 0, "pool_size", f"must be positive, got {self.pool_size}")
        require(self.prompt_length > 0, "prompt_length", f"must be positive, got {self.prompt_length}")
        require(0 < self.top_k <= self.pool_size, "top_k", f"must be in [1, pool_size], got {self.top_k}")
        require(self.pull_weight >= 0, "pull_weight", f"must be >= 0, got {self.pull_weight}")


@register_method("l2p", L2PConfig)
class L2P(PromptLearner):
    options: L2PConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options, width = self.options, backbone.num_features
        self.tokens = PromptTokenInjector(backbone)
        self.injectors = [self.tokens]
        self.pool = PromptPool(options.pool_size, (options.prompt_length, width), width, options.top_k,
                               options.batchwise_selection)

    def prompted_features(self, images: Tensor, task: Task | None) -> tuple[Tensor, Tensor]:
        selection = self.pool.select(self.query(images))
        prompts = self.pool.gather(selection.indices).flatten(1, 2)  # (B, N x length, C)
        with self.tokens.inserting(prompts):
            tokens = self.backbone.forward_features(images)
        first = self.tokens.n_prefix
        if self.options.head_input == "prompts":
            return tokens[:, first: first + prompts.shape[1]].mean(1), selection.pull
        return tokens[:, 0], selection.pull

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        features, pull = self.prompted_features(images, task)
        classification = self.current_task_loss(features, targets, task)
        loss = classification - self.options.pull_weight * pull
        return StepOutput(loss, {"loss": loss.item(), "pull": pull.item()})
