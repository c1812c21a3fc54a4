"""Frozen experts, routers and class perceptrons of one block, folded into r-wide routing tables.

Routing reads expert i's CLS output c_i = h_i·U_i + u_i (h_i = ReLU(x̂·D_iᵀ + d_i), r wide) only
through three maps, each linear or quadratic in h_i, so each folds into a table built once per task:

  c_i - mean(c_i) = h_i·U'_i + u'_i            U', u': U, u centred over the C channels
  C·var(c_i)      = h_i·G_i·h_iᵀ + 2 h_i·g_i + β_i       G = U'U'ᵀ, g = U'u', β = u'·u'
  H_i(c_i)        = (h_i·P_i + q_i) / σ_i + b_i          P = U'W̃ᵀ, q = W̃u' (W̃: LN affine folded)
  R_i(c_i)        = h_i·Q_i + o_i                        Q = U·W_Rᵀ, o = W_R·u + b_R

A forward therefore never forms a C-wide vector per expert, and the router tables hold r/C of the
routers' weights (1/48 for ViT-B): the routers themselves are never copied. Tables are computed
in float64 and stored in the parameters' dtype (the LayerNorm quadratic form stays float64).

Every task but the newest is frozen, so tables only grow: a new task appends its rows into spare
capacity (amortised O(one task)), and the newest task's slot is rewritten in place when its
parameters change (no-grad forwards). `load_state_dict`, device/dtype moves and `invalidate`
drop everything; the next forward rebuilds it in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from carecl.tuners.brmoe.adapter import Adapter, FoldedAdapter

# Capacity multiplier when a table runs out of rows (bounds spare memory to 25%).
GROWTH = 1.25


class GrowingRows:
    """A tensor grown along dim 0 into spare capacity; `data` is the filled prefix (a view)."""

    def __init__(self, rows: Tensor) -> None:
        self.buffer = rows
        self.size = rows.shape[0]

    @property
    def data(self) -> Tensor:
        return self.buffer[: self.size]

    def append(self, rows: Tensor) -> None:
        needed = self.size + rows.shape[0]
        if needed > self.buffer.shape[0]:
            capacity = max(needed, int(self.buffer.shape[0] * GROWTH) + 1)
            grown = self.buffer.new_empty((capacity, *self.buffer.shape[1:]))
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : needed] = rows
        self.size = needed

    def write(self, start: int, rows: Tensor) -> None:
        self.buffer[start : start + rows.shape[0]] = rows


@dataclass
class TaskTables:
    """One task's folded expert and routing tables (see the module docstring for the symbols)."""

    expert: FoldedAdapter  # down (r, C), down_bias (r,), up (r, C), up_bias (C,)
    norm_quadratic: Tensor  # G (r, r), float64
    norm_linear: Tensor  # 2g (r,), float64
    norm_constant: Tensor  # β (), float64
    perceptron_products: Tensor  # P (r, n)
    perceptron_offsets: Tensor  # q (n,)
    perceptron_bias: Tensor  # b (n,)
    router_products: Tensor  # Qᵀ (i+1, r): row j scores expert j
    router_offsets: Tensor  # o (i+1,)

    @classmethod
    def compute(cls, expert: Adapter, router: nn.Linear, perceptron: nn.Sequential) -> "TaskTables":
        folded = expert.fold()
        dtype = folded.up.dtype
        up, up_bias = folded.up.double(), folded.up_bias.double()
        centred_up = up - up.mean(dim=1, keepdim=True)
        centred_bias = up_bias - up_bias.mean()
        norm, linear = perceptron[0], perceptron[1]
        weight = linear.weight.double() * norm.weight.double()
        router_weight = router.weight.double()
        return cls(
            expert=folded,
            norm_quadratic=centred_up @ centred_up.T,
            norm_linear=2 * (centred_up @ centred_bias),
            norm_constant=centred_bias @ centred_bias,
            perceptron_products=(centred_up @ weight.T).to(dtype),
            perceptron_offsets=(weight @ centred_bias).to(dtype),
            perceptron_bias=(linear.weight.double() @ norm.bias.double() + linear.bias.double()).to(dtype),
            router_products=(router_weight @ up.T).to(dtype),
            router_offsets=(router_weight @ up_bias + router.bias.double()).to(dtype),
        )


@dataclass
class PerceptronGroup:
    """Consecutive perceptrons with the same class count, stacked: tasks [start, stop)."""

    start: int
    stop: int
    products: GrowingRows  # (stop - start, r, n)
    offsets: GrowingRows  # (stop - start, n)
    bias: GrowingRows  # (stop - start, n)

    @property
    def n_classes(self) -> int:
        return self.bias.buffer.shape[1]


class PartsBank:
    """All tasks' tables of one block, stacked: slot i holds task i."""

    def __init__(self, tables: list[TaskTables], newest_version: tuple) -> None:
        first = tables[0]
        self.n_tasks = len(tables)
        self.reference = (first.router_products.device, first.router_products.dtype)
        self.expert_rows = [GrowingRows(torch.stack(parts)) for parts in zip(*(t.expert.astuple() for t in tables))]
        self.norm_rows = [GrowingRows(torch.stack(parts)) for parts in
                          zip(*((t.norm_quadratic, t.norm_linear, t.norm_constant) for t in tables))]
        # Router i's rows live at [1 + i(i+1)/2, 1 + i(i+1)/2 + i]: packed, never padded to (T, T, r).
        # Row 0 (zero products, offset -inf) stands for the experts newer than a router.
        padding_products = first.router_products.new_zeros(1, first.router_products.shape[1])
        padding_offsets = first.router_offsets.new_full((1,), float("-inf"))
        self.router_product_rows = GrowingRows(torch.cat([padding_products, *(t.router_products for t in tables)]))
        self.router_offset_rows = GrowingRows(torch.cat([padding_offsets, *(t.router_offsets for t in tables)]))
        self.perceptron_groups: list[PerceptronGroup] = []
        for index, table in enumerate(tables):
            self._append_perceptron(index, table)
        self.newest_version = newest_version

    # ---- building ---------------------------------------------------------------------
    @classmethod
    def build(cls, experts: list[Adapter], routers: list[nn.Linear], perceptrons: list[nn.Sequential]) -> "PartsBank":
        # Normal tensors even when first used under inference_mode: later training forwards read them.
        with torch.inference_mode(False), torch.no_grad():
            tables = [TaskTables.compute(*parts) for parts in zip(experts, routers, perceptrons)]
            return cls(tables, parameter_version(experts[-1], routers[-1], perceptrons[-1]))

    def matches(self, reference: Tensor) -> bool:
        return self.reference == (reference.device, reference.dtype)

    def extend(self, experts: list[Adapter], routers: list[nn.Linear], perceptrons: list[nn.Sequential]) -> None:
        """Re-read the previously newest task (trained since), then append the tasks added after it."""
        with torch.inference_mode(False), torch.no_grad():
            last = self.n_tasks - 1
            self._write(last, TaskTables.compute(experts[last], routers[last], perceptrons[last]))
            for index in range(self.n_tasks, len(experts)):
                self._append(index, TaskTables.compute(experts[index], routers[index], perceptrons[index]))
            self.n_tasks = len(experts)
            self.newest_version = parameter_version(experts[-1], routers[-1], perceptrons[-1])

    def refresh_newest(self, expert: Adapter, router: nn.Linear, perceptron: nn.Sequential) -> None:
        """Recompute the newest task's (trainable) slot if its parameters changed since."""
        version = parameter_version(expert, router, perceptron)
        if version == self.newest_version:
            return
        with torch.inference_mode(False), torch.no_grad():
            self._write(self.n_tasks - 1, TaskTables.compute(expert, router, perceptron))
        self.newest_version = version

    def _append(self, index: int, tables: TaskTables) -> None:
        for rows, value in zip(self.expert_rows, tables.expert.astuple()):
            rows.append(value[None])
        for rows, value in zip(self.norm_rows, (tables.norm_quadratic, tables.norm_linear, tables.norm_constant)):
            rows.append(value[None])
        self.router_product_rows.append(tables.router_products)
        self.router_offset_rows.append(tables.router_offsets)
        self._append_perceptron(index, tables)

    def _append_perceptron(self, index: int, tables: TaskTables) -> None:
        # Release: with an unequal first task (B100 Inc3) H_0 is scored apart from H_1.. and the
        # entropies concatenated; grouping runs of equal class count does the same for any split.
        values = (tables.perceptron_products, tables.perceptron_offsets, tables.perceptron_bias)
        group = self.perceptron_groups[-1] if self.perceptron_groups else None
        if group is not None and group.stop == index and group.n_classes == tables.perceptron_bias.shape[0]:
            for rows, value in zip((group.products, group.offsets, group.bias), values):
                rows.append(value[None])
            group.stop += 1
        else:
            self.perceptron_groups.append(PerceptronGroup(index, index + 1, *(GrowingRows(v[None].clone()) for v in values)))

    def _write(self, index: int, tables: TaskTables) -> None:
        for rows, value in zip(self.expert_rows, tables.expert.astuple()):
            rows.write(index, value[None])
        for rows, value in zip(self.norm_rows, (tables.norm_quadratic, tables.norm_linear, tables.norm_constant)):
            rows.write(index, value[None])
        start = 1 + index * (index + 1) // 2
        self.router_product_rows.write(start, tables.router_products)
        self.router_offset_rows.write(start, tables.router_offsets)
        group = next(g for g in self.perceptron_groups if g.start <= index < g.stop)
        values = (tables.perceptron_products, tables.perceptron_offsets, tables.perceptron_bias)
        for rows, value in zip((group.products, group.offsets, group.bias), values):
            rows.write(index - group.start, value[None])

    # ---- reading ----------------------------------------------------------------------
    @property
    def experts(self) -> FoldedAdapter:
        """Folded experts: down (T, r, C), down_bias (T, r), up (T, r, C), up_bias (T, C)."""
        return FoldedAdapter(*(rows.data for rows in self.expert_rows))

    @property
    def norm_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """(G (T, r, r), 2g (T, r), β (T,)), float64."""
        return tuple(rows.data for rows in self.norm_rows)

    @property
    def router_tables(self) -> tuple[Tensor, Tensor]:
        """(products (1 + T(T+1)/2, r), offsets (1 + T(T+1)/2,)), padding row first."""
        return self.router_product_rows.data, self.router_offset_rows.data

    def nbytes(self) -> int:
        """Bytes held, spare capacity included."""
        rows = [*self.expert_rows, *self.norm_rows, self.router_product_rows, self.router_offset_rows,
                *(r for g in self.perceptron_groups for r in (g.products, g.offsets, g.bias))]
        return sum(r.buffer.numel() * r.buffer.element_size() for r in rows)


def parameter_version(*modules: nn.Module) -> tuple:
    """Changes whenever a parameter is modified in place (optimiser step, copy_) or replaced."""
    return tuple((p._version, p.data_ptr()) for module in modules for p in module.parameters())
