"""Experts, routers and class perceptrons of one block, folded and stacked for batched use.

Every task but the newest is frozen, so the stack is built once per task (and after
`load_state_dict`, device/dtype moves, `invalidate`) instead of on every forward. The newest
task's slot is refreshed in place, only when its parameters changed, for no-grad forwards;
forwards that need gradients use the newest parts live instead of that slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from carecl.brmoe.adapter import Adapter, FoldedAdapter, fold_perceptron


@dataclass
class PerceptronGroup:
    """Consecutive perceptrons with the same class count, stacked: tasks [start, stop)."""

    start: int
    stop: int
    weight: Tensor  # (stop - start, n, C), LayerNorm affine folded in
    bias: Tensor  # (stop - start, n)


@dataclass
class PartsBank:
    n_tasks: int
    experts: FoldedAdapter  # down (T, r, C), down_bias (T, r), up (T, r, C), up_bias (T, C)
    # Router i's rows live at [i(i+1)/2, i(i+1)/2 + i]: packed, never padded to (T, T, C).
    # One extra zero row with bias -inf stands for the padding (experts newer than a router).
    router_rows: Tensor  # (T(T+1)/2 + 1, C)
    router_bias: Tensor  # (T(T+1)/2 + 1,)
    router_index: Tensor  # (T, T) long: row scoring expert j for router i, the padding row if j > i
    perceptron_groups: list[PerceptronGroup]
    newest_version: tuple

    @classmethod
    def build(cls, experts: list[Adapter], routers: list[nn.Linear], perceptrons: list[nn.Sequential]) -> "PartsBank":
        # Normal tensors even when first used under inference_mode: later training forwards read them.
        with torch.inference_mode(False), torch.no_grad():
            n_tasks = len(experts)
            rows = torch.cat([router.weight for router in routers])
            bias = torch.cat([router.bias for router in routers])
            return cls(
                n_tasks=n_tasks,
                experts=FoldedAdapter.stack([expert.fold() for expert in experts]),
                router_rows=torch.cat([rows, rows.new_zeros(1, rows.shape[1])]),
                router_bias=torch.cat([bias, bias.new_full((1,), float("-inf"))]),
                router_index=_router_index(n_tasks, rows.device),
                perceptron_groups=_group_perceptrons(perceptrons),
                newest_version=parameter_version(experts[-1], routers[-1], perceptrons[-1]),
            )

    def matches(self, n_tasks: int, reference: Tensor) -> bool:
        rows = self.router_rows
        return self.n_tasks == n_tasks and rows.device == reference.device and rows.dtype == reference.dtype

    def refresh_newest(self, expert: Adapter, router: nn.Linear, perceptron: nn.Sequential) -> None:
        """Copy the newest task's (trainable) parts into their slot if they changed since."""
        version = parameter_version(expert, router, perceptron)
        if version == self.newest_version:
            return
        with torch.inference_mode(False), torch.no_grad():
            slot = self.n_tasks - 1
            for stacked, value in zip(self.experts.astuple(), expert.fold().astuple()):
                stacked[slot].copy_(value)
            start = slot * (slot + 1) // 2
            self.router_rows[start:start + slot + 1].copy_(router.weight)
            self.router_bias[start:start + slot + 1].copy_(router.bias)
            group = self.perceptron_groups[-1]
            weight, bias = fold_perceptron(perceptron)
            group.weight[-1].copy_(weight)
            group.bias[-1].copy_(bias)
        self.newest_version = version


def parameter_version(*modules: nn.Module) -> tuple:
    """Changes whenever a parameter is modified in place (optimiser step, copy_) or replaced."""
    return tuple((p._version, p.data_ptr()) for module in modules for p in module.parameters())


def _router_index(n_tasks: int, device: torch.device) -> Tensor:
    routers = torch.arange(n_tasks, device=device)[:, None]
    experts = torch.arange(n_tasks, device=device)[None, :]
    padding_row = n_tasks * (n_tasks + 1) // 2
    return torch.where(experts <= routers, routers * (routers + 1) // 2 + experts, padding_row)


def _group_perceptrons(perceptrons: list[nn.Sequential]) -> list[PerceptronGroup]:
    # Release: with an unequal first task (B100 Inc3) H_0 is scored apart from H_1.. and the
    # entropies concatenated; grouping runs of equal class count does the same for any split.
    groups, start = [], 0
    for index in range(1, len(perceptrons) + 1):
        if index == len(perceptrons) or _n_classes(perceptrons[index]) != _n_classes(perceptrons[start]):
            folded = [fold_perceptron(p) for p in perceptrons[start:index]]
            groups.append(PerceptronGroup(start, index, torch.stack([w for w, _ in folded]),
                                          torch.stack([b for _, b in folded])))
            start = index
    return groups


def _n_classes(perceptron: nn.Sequential) -> int:
    return perceptron[1].out_features
