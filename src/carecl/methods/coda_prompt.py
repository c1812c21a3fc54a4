"""CODA-Prompt ("CODA-Prompt: COntinual Decomposed Attention-based Prompting", Smith et al., CVPR 2023), as
LAMDA-PILOT runs it: in each of blocks `layers`, a pool of prompt components P_m (length x C), each with a
key K_m and an attention vector A_m. No top-k: an image's prompt is Σ_m α_m P_m with
α_m = cos(q ⊙ A_m, K_m), q the frozen ViT's CLS feature; its first half gives prefix keys, the second half
prefix values. The pool is split evenly among the tasks: task t trains its own components, earlier ones
take part frozen, later ones are not used yet. Each task's components (and keys and attention vectors)
start as random vectors minus their projections on every earlier row (the authors' classical Gram-Schmidt:
orthonormal within a task, nearly orthogonal to trained earlier rows); `orthogonality_weight` adds
the authors' penalty ‖X Xᵀ - I‖² on them (0 in every published config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.config import ConfigError, ExperimentConfig, require
from carecl.methods.base import StepOutput, register_method
from carecl.methods.prompt_learner import PromptLearner, PromptScheduleOptions, prompted_blocks
from carecl.scenario import Scenario, Task
from carecl.tuners.prefix import Prefix, PrefixInjector


@dataclass
class CODAPromptConfig(PromptScheduleOptions):
    name: str = "coda_prompt"
    # `prompt_param` = [pool_size, prompt_length, orthogonality_weight].
    pool_size: int = 100
    prompt_length: int = 8
    orthogonality_weight: float = 0.0
    # Prefixed blocks; null = blocks 0-4 (those the ViT has).
    layers: list[int] | None = None
    schedule: Literal["constant", "cosine", "coda_cosine"] = "coda_cosine"

    def validate(self) -> None:
        require(self.pool_size > 0, "pool_size", f"must be positive, got {self.pool_size}")
        require(self.prompt_length >= 2 and self.prompt_length % 2 == 0, "prompt_length",
                f"must be even and >= 2 (half keys, half values), got {self.prompt_length}")
        require(self.orthogonality_weight >= 0, "orthogonality_weight", f"must be >= 0, got {self.orthogonality_weight}")
        require(self.layers is None or len(self.layers) > 0, "layers", "must name at least one block")


def gram_schmidt_rows(rows: Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> Tensor:
    """Rows [start, stop) replaced by N(0, 1) vectors minus their projections on every row before them (one
    projection per earlier row, as the authors' `gram_schmidt`), then normalised; rows from `stop` on are zeros."""
    flat = rows.reshape(rows.shape[0], -1)
    out = torch.zeros_like(flat)
    out[:start] = flat[:start]
    for k in range(start, stop):
        candidate = torch.randn(flat.shape[1], generator=generator, dtype=flat.dtype).to(flat.device)
        earlier = out[:k]
        squared = (earlier * earlier).sum(1)
        if bool((squared < 1e-8).any()):
            raise ValueError("Gram-Schmidt: an earlier prompt component is (almost) zero")
        out[k] = candidate - ((earlier @ candidate) / squared) @ earlier
    out[start:stop] = out[start:stop] / out[start:stop].norm(dim=1, keepdim=True)
    return out.reshape(rows.shape)


def orthogonality_penalty(rows: Tensor) -> Tensor:
    flat = rows.reshape(rows.shape[0], -1)
    return ((flat @ flat.T - torch.eye(len(flat), device=flat.device)) ** 2).mean()


@register_method("coda_prompt", CODAPromptConfig)
class CODAPrompt(PromptLearner):
    options: CODAPromptConfig
    cannot_learn_beyond_its_stream = ("its pool of method.pool_size prompt components is shared out among the stream's "
                                      "tasks when it is built (pool_size // tasks each), so a further task would take "
                                      "components from the tasks already learned")

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options, width = self.options, backbone.num_features
        self.layers = prompted_blocks(options.layers, [0, 1, 2, 3, 4], len(backbone.blocks), "layers")
        self.per_task = options.pool_size // scenario.n_tasks
        if self.per_task == 0:
            raise ConfigError(f"method.pool_size {options.pool_size} gives no component to each of {scenario.n_tasks} "
                             "tasks: it must be at least the number of tasks")
        self.prefixes = PrefixInjector(backbone, self.layers)
        self.injectors = [self.prefixes]
        layers, pool = len(self.layers), options.pool_size
        self.components = nn.Parameter(torch.zeros(layers, pool, options.prompt_length, width))
        self.keys = nn.Parameter(torch.zeros(layers, pool, width))
        self.attention = nn.Parameter(torch.zeros(layers, pool, width))

    def build_head(self, width: int, n_classes: int) -> nn.Linear:
        return nn.Linear(width, n_classes)  # the authors' plain nn.Linear init, unlike L2P's and DualPrompt's

    def components_of(self, task_index: int) -> tuple[int, int]:
        return task_index * self.per_task, (task_index + 1) * self.per_task

    def begin_task(self, task: Task) -> None:
        start, stop = self.components_of(task.index)
        with torch.no_grad():
            for tensor in (self.components, self.keys, self.attention):
                for layer in range(tensor.shape[0]):
                    tensor[layer] = gram_schmidt_rows(tensor[layer], start, stop)

    def layer_prefix(self, layer: int, query: Tensor, stop: int, trained_from: int | None) -> tuple[Prefix, Tensor]:
        """Block `layer`'s prefix from components [0, stop); with `trained_from`, those before it are frozen."""
        parts = [self.components[layer, :stop], self.keys[layer, :stop], self.attention[layer, :stop]]
        if trained_from is not None:
            parts = [torch.cat([p[:trained_from].detach(), p[trained_from:]]) for p in parts]
        components, keys, attention = parts
        weights = torch.einsum("bkd,kd->bk", F.normalize(query[:, None] * attention, dim=2), F.normalize(keys, dim=1))
        prompt = torch.einsum("bk,kld->bld", weights, components)
        half = prompt.shape[1] // 2
        penalty = query.new_zeros(())
        if trained_from is not None and self.options.orthogonality_weight > 0:
            penalty = sum(orthogonality_penalty(p) for p in parts) * self.options.orthogonality_weight
        return Prefix(prompt[:, :half], prompt[:, half:]), penalty

    def prompted_features(self, images: Tensor, task: Task | None) -> tuple[Tensor, Tensor]:
        """(CLS features, orthogonality penalty): training task t uses components [0, end of t), at test all
        learned tasks' components."""
        query = self.query(images)
        if task is None:
            stop, trained_from = self.components_of(self.n_learned_tasks - 1)[1], None
        else:
            trained_from, stop = self.components_of(task.index)
        per_block, penalty = {}, query.new_zeros(())
        for index, layer in enumerate(self.layers):
            per_block[layer], layer_penalty = self.layer_prefix(index, query, stop, trained_from)
            penalty = penalty + layer_penalty
        with self.prefixes.prefixes(per_block):
            return self.backbone(images), penalty

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        features, penalty = self.prompted_features(images, task)
        loss = self.current_task_loss(features, targets, task) + penalty
        return StepOutput(loss, {"loss": loss.item()})
