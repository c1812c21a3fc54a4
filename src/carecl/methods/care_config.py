"""CaRE's options (kept apart from the learner so configs load without building models)."""

from __future__ import annotations

from dataclasses import dataclass, field

from carecl.alignment import AlignmentConfig
from carecl.config import METHOD_CONFIGS, ConfigError, MethodConfig


@METHOD_CONFIGS.register("care")
@dataclass
class CareConfig(MethodConfig):
    name: str = "care"
    adapter_dim: int = 64
    expert_dim: int = 16
    topk_experts: int = 3
    topk_routers: int = 2
    adapter_dropout: float = 0.1
    # µ of the shared-adapter anchoring (the release calls it EMA).
    anchor_momentum: float = 0.999
    # τ: cosine logits are multiplied by it in every loss.
    scale: float = 20.0
    aux_cos_loss: bool = True
    self_dist_loss: bool = True
    iter_pred: bool = True
    # The release never uses iterative prediction after this many tasks.
    iter_pred_max_tasks: int = 60
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    def validate(self) -> None:
        for key in ("adapter_dim", "expert_dim", "topk_experts", "topk_routers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.anchor_momentum <= 1.0:
            raise ConfigError(f"method.anchor_momentum must be in [0, 1], got {self.anchor_momentum}")
