"""NoRGa ("Mixture of Experts Meets Prompt-Based Continual Learning", Le et al., NeurIPS 2024; code
Minhchuyentoancbn/MoE_PromptCL): HiDe-Prompt with a non-linear residual gate on the prefix scores. In a
prompted block each query's score on a prefix key, s = q·p_K / √d (a prefix expert's gating score), becomes
s + α·σ(τ·s) before the joint softmax over prefix and token keys; token-token scores are unchanged. One
(τ, α) pair per prompted block, shared by heads and tasks, starting at 1 and trained in the first task only
(frozen from the second, as their code does). With σ the identity the gate only rescales, (1 + ατ)·s; with
α = 0 it is plain prefix tuning (HiDe-Prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from carecl.config import ExperimentConfig
from carecl.methods.base import register_method
from carecl.methods.hide_prompt import HiDePrompt, HiDePromptConfig
from carecl.scenario import Scenario, Task

GATES = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": nn.functional.gelu, "relu": torch.relu,
         "softplus": nn.functional.softplus, "elu": nn.functional.elu, "identity": lambda x: x}


@dataclass
class NoRGaConfig(HiDePromptConfig):
    name: str = "norga"
    # σ, the gate's activation (`gate_act`); each published run names its own (docs/reproduction.md).
    gate: Literal["tanh", "sigmoid", "gelu", "relu", "softplus", "elu", "identity"] = "tanh"


def gated_prefix_scores(scores: Tensor, n_prefix: int, tau: Tensor, alpha: Tensor, gate) -> Tensor:
    """Scores (B, H, N, P + N) with the first P columns s replaced by s + α·σ(τ·s)."""
    if n_prefix == 0:
        return scores
    prefix = scores[..., :n_prefix]
    return torch.cat([prefix + alpha * gate(tau * prefix), scores[..., n_prefix:]], dim=-1)


@register_method("norga", NoRGaConfig)
class NoRGa(HiDePrompt):
    options: NoRGaConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        # act_scale[l] = (τ_l, α_l), as their `e_prompt.act_scale`.
        self.act_scale = nn.Parameter(torch.ones(len(self.layers), 2))
        self.layer_position = {layer: index for index, layer in enumerate(self.layers)}
        self.prefixes.score_hook = self.gate_scores

    def gate_scores(self, block: int, scores: Tensor, n_prefix: int) -> Tensor:
        tau, alpha = self.act_scale[self.layer_position[block]].to(scores.dtype)
        return gated_prefix_scores(scores, n_prefix, tau, alpha, GATES[self.options.gate])

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.act_scale.requires_grad_(task.index == 0)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.prompts, *([self.act_scale] if self.act_scale.requires_grad else [])]
