"""Options of the BR-MoE adapter (plain typed fields, parsed from YAML by carecl.config; torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from carecl.config import require


@dataclass
class BRMoEConfig:
    # Bottleneck of the shared adapter Ē.
    adapter_dim: int = 64
    # Bottleneck of each task expert E_i.
    expert_dim: int = 16
    # K: experts kept per selected router.
    topk_experts: int = 3
    # M: routers selected per sample (lowest class-perceptron entropy).
    topk_routers: int = 2
    adapter_dropout: float = 0.1
    # µ of the shared-adapter anchoring (the release calls it EMA).
    anchor_momentum: float = 0.999

    def validate(self) -> None:
        for key in ("adapter_dim", "expert_dim", "topk_experts", "topk_routers"):
            value = getattr(self, key)
            require(not isinstance(value, bool) and isinstance(value, int) and value > 0, key,
                    f"must be a positive integer, got {value!r}")
        require(0.0 <= self.adapter_dropout < 1.0, "adapter_dropout", f"must be in [0, 1), got {self.adapter_dropout}")
        require(0.0 <= self.anchor_momentum <= 1.0, "anchor_momentum", f"must be in [0, 1], got {self.anchor_momentum}")
