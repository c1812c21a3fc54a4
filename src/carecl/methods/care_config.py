"""CaRE's options: torch-free, kept apart from the learner (methods/care.py registers both)."""

from __future__ import annotations

from dataclasses import dataclass, field

from carecl.alignment_config import AlignmentConfig
from carecl.config import MethodConfig, require
from carecl.tuners.brmoe.config import BRMoEConfig


@dataclass
class CareConfig(MethodConfig):
    """CaRE's options: the BR-MoE adapter's (`brmoe:`) plus the learner's."""

    name: str = "care"
    brmoe: BRMoEConfig = field(default_factory=BRMoEConfig)
    # τ: cosine logits are multiplied by it in every loss.
    scale: float = 20.0
    aux_cos_loss: bool = True
    self_dist_loss: bool = True
    iter_pred: bool = True
    # Iterative prediction is used while at most this many tasks are learned (the release: task index <= 60).
    iter_pred_max_tasks: int = 61
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    moved_keys = {key: f"brmoe.{key}" for key in ("adapter_dim", "expert_dim", "topk_experts", "topk_routers",
                                                  "adapter_dropout", "anchor_momentum")}

    def validate(self) -> None:
        require(self.scale > 0, "scale", f"must be positive, got {self.scale}")
        require(self.iter_pred_max_tasks >= 0, "iter_pred_max_tasks", f"must be >= 0, got {self.iter_pred_max_tasks}")
