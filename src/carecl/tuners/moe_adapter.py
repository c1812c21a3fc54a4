"""Mixture-of-experts adapters (MoE-Adapters4CL): in every block a bank of bottleneck adapters parallel to
the MLP, mixed per sample by a noisy top-k router that reads the block's token 0.

    h     = x + attn(ln_1(x))
    x_out = h + mlp(ln_2(h)) + sum_{e in topk} G[e] A_e(h)       # the experts read h itself, not ln_2(h)
    G     = softmax over the k largest of c Wg[r] (+ N(0, 1) (softplus(c Wn[r]) + 0.01) when noisy),  c = h[:, 0]

Routers (Wg, Wn; zero at creation) are added one at a time (`add_router`): one shared router (CIL) or one
per task (MTIL). `route = None` bypasses every bank, so the tower computes exactly the frozen model.
Each bank counts how many samples chose each expert while `counting` is on (activate-freeze reads them).
The experts run only on the samples routed to them (the authors' sparse dispatch, same sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.config import require
from carecl.tuners.adapter import AdapterConfig, BottleneckAdapter
from carecl.tuners.base import Injector, ParallelBranch


@dataclass
class MoEAdapterConfig:
    experts: int = 2
    top_k: int = 2
    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    # Added to softplus(c Wn) so the noise never vanishes.
    noise_epsilon: float = 0.01

    def validate(self) -> None:
        require(self.experts > 0, "experts", f"must be positive, got {self.experts}")
        require(0 < self.top_k <= self.experts, "top_k", f"must be in 1..experts ({self.experts}), got {self.top_k}")
        require(self.bottleneck > 0, "bottleneck", f"must be positive, got {self.bottleneck}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.noise_epsilon >= 0, "noise_epsilon", f"must be >= 0, got {self.noise_epsilon}")

    @property
    def adapter(self) -> AdapterConfig:
        return AdapterConfig(self.bottleneck, self.scale, layer_norm=False, dropout=self.dropout)


def noisy_top_k_gates(tokens: Tensor, w_gate: Tensor, w_noise: Tensor, k: int, noisy: bool, epsilon: float) -> Tensor:
    """(N, E) gates: softmax over each row's k largest (noisy) router logits, zero elsewhere."""
    logits = tokens @ w_gate
    if noisy:
        logits = logits + torch.randn_like(logits) * (F.softplus(tokens @ w_noise) + epsilon)
    top_values, top_index = logits.topk(min(k, logits.shape[1]), dim=1)
    return torch.zeros_like(logits).scatter(1, top_index, top_values.softmax(dim=1))


class ExpertBank(nn.Module):
    """One block's experts, its routers (one per router index) and its usage counts."""

    def __init__(self, width: int, config: MoEAdapterConfig) -> None:
        super().__init__()
        self.width = width
        self.experts = nn.ModuleList(BottleneckAdapter(width, config.adapter) for _ in range(config.experts))
        self.gates = nn.ParameterList()
        self.noise = nn.ParameterList()
        self.register_buffer("usage", torch.zeros(config.experts))
        # Experts frozen after an earlier task (activate-freeze): saved with the weights, not in a side file.
        self.register_buffer("frozen", torch.zeros(config.experts, dtype=torch.bool))

    def add_router(self) -> None:
        reference = self.usage
        for routers in (self.gates, self.noise):
            routers.append(nn.Parameter(torch.zeros(self.width, len(self.experts), device=reference.device)))

    def mix(self, hidden: Tensor, gates: Tensor) -> Tensor:
        """sum_e gates[n, e] A_e(hidden[n]), each expert run on the samples that selected it."""
        out = torch.zeros_like(hidden)
        for index in gates.gt(0).any(dim=0).nonzero().flatten().tolist():
            rows = gates[:, index].nonzero().flatten()
            weight = gates[rows, index].to(hidden.dtype).view(-1, *[1] * (hidden.dim() - 1))
            out = out.index_add(0, rows, weight * self.experts[index](hidden[rows]))
        return out


class MoEAdapterInjector(Injector):
    """An `ExpertBank` parallel to every block of a timm ViT or of either open_clip tower."""

    wraps_clip_towers = True

    def __init__(self, tower: nn.Module, config: MoEAdapterConfig) -> None:
        super().__init__(tower)
        config.validate()
        self.config = config
        reference = next(tower.parameters())
        self.banks = nn.ModuleList(ExpertBank(self.layout.width, config) for _ in self.blocks).to(
            reference.device, reference.dtype)
        self.route: int | None = None
        self.noisy = False
        self.counting = False
        ParallelBranch(self, self._branch)

    @property
    def n_routers(self) -> int:
        return len(self.banks[0].gates)

    def add_router(self) -> int:
        """A new zero router in every bank; its index."""
        for bank in self.banks:
            bank.add_router()
        return self.n_routers - 1

    def router_parameters(self, index: int) -> list[nn.Parameter]:
        return [p for bank in self.banks for p in (bank.gates[index], bank.noise[index])]

    def gates(self, index: int, hidden: Tensor) -> Tensor:
        bank = self.banks[index]
        return noisy_top_k_gates(hidden[:, 0], bank.gates[self.route], bank.noise[self.route], self.config.top_k,
                                 self.noisy, self.config.noise_epsilon)

    def _branch(self, index: int, hidden: Tensor) -> Tensor | None:
        if self.route is None:
            return None
        gates = self.gates(index, hidden)
        bank = self.banks[index]
        if self.counting:
            bank.usage += gates.gt(0).sum(dim=0).to(bank.usage.dtype)
        return bank.mix(hidden, gates)

    def reset_usage(self) -> None:
        for bank in self.banks:
            bank.usage.zero_()

    def freeze_most_used(self, n: int) -> list[tuple[int, int]]:
        """Freeze each bank's `n` most-used experts (ties to the lower index); the (block, expert) pairs frozen."""
        frozen = []
        for block, bank in enumerate(self.banks):
            for expert in torch.sort(bank.usage, descending=True, stable=True).indices[:n].tolist():
                bank.frozen[expert] = True
                frozen.append((block, expert))
        self.apply_frozen()
        return frozen

    def apply_frozen(self) -> None:
        """requires_grad off for every frozen expert (after a checkpoint's `frozen` flags load)."""
        for bank in self.banks:
            for expert, frozen in zip(bank.experts, bank.frozen.tolist()):
                expert.requires_grad_(not frozen)
