"""The BR-MoE layer of one ViT block: shared adapter, task experts, routers, class perceptrons.

Sparse and exact: routing reads only the CLS token (adapters are token-wise, so
c_i = E_i(z_a)[CLS] = E_i(z_a[CLS])), and only through r-wide tables folded once per task
(`bank.py`): per expert and sample, routing costs one r-wide hidden vector, never a C-wide
output. Only the at most M·K experts a sample routes to are applied to its tokens, and never as
a (batch, experts, tokens, C) tensor. The op sequence of a forward does not depend on the
number of tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.tuners.brmoe.adapter import (LAYER_NORM_EPS, Adapter, FoldedAdapter, add_parameters, initialise_from_mean,
                                  make_perceptron, make_router, normalise, parameter_sums)
from carecl.tuners.brmoe.bank import PartsBank, parameter_version
from carecl.tuners.brmoe.config import BRMoEConfig
from carecl.tuners.brmoe.routing import expert_mixture, negative_entropy, packed_router_scores, select_routers


@dataclass
class RoutingRecord:
    """One forward's routing decisions in one block (detached), for diagnostics.

    routers (B, M') router ids, forced router first in task-known forwards; confidence (B, n)
    negative perceptron entropies of the candidate routers 0..n-1 (None when nothing was chosen);
    experts / weights (B, M', K') the experts each selected router mixes and their weights.
    """

    routers: Tensor
    confidence: Tensor | None
    experts: Tensor
    weights: Tensor


@dataclass
class _ForwardParts:
    """Where one forward reads each part: bank slots [0, n_stacked), the rest live."""

    bank: PartsBank
    n_stacked: int
    shared: FoldedAdapter
    # The newest expert, folded with gradients, when this forward uses it live.
    newest: FoldedAdapter | None

    @property
    def newest_index(self) -> int:
        return self.bank.n_tasks - 1

    def is_live(self, expert: int) -> bool:
        return self.newest is not None and expert == self.newest_index


@dataclass
class _ExpertSums:
    """Float64 parameter sums of experts [0, count): the mean-initialisation of new experts."""

    count: int
    sums: list[Tensor]


class BRMoELayer(nn.Module):
    def __init__(self, dim: int, config: BRMoEConfig) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.shared = Adapter(dim, config.adapter_dim, config.adapter_dropout)
        self.experts = nn.ModuleList()
        self.routers = nn.ModuleList()
        self.perceptrons = nn.ModuleList()
        self.dropout = nn.Dropout(config.adapter_dropout)
        self._bank: PartsBank | None = None
        self._shared_fold: tuple[tuple, FoldedAdapter] | None = None
        self._expert_sums: _ExpertSums | None = None
        self._anchor: list[Tensor] | None = None
        # Instrumentation: how many (sample, expert) pairs ran on all tokens in the last forward.
        self.last_token_expert_runs = 0
        # Full rebuilds of the frozen tables (growing by a task appends instead).
        self.bank_builds = 0
        # Set to a list to record a RoutingRecord per forward (diagnostics); None costs nothing.
        self.routing_trace: list[RoutingRecord] | None = None
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    @property
    def n_tasks(self) -> int:
        return len(self.experts)

    # ---- growth --------------------------------------------------------------------------
    def add_task(self, n_classes: int) -> None:
        """New expert E_t, router R_t (C -> t+1), perceptron H_t; freeze the previous task's parts."""
        index = self.n_tasks
        reference = self.shared.scale
        expert = Adapter(self.dim, self.config.expert_dim, self.config.adapter_dropout)
        router, perceptron = make_router(self.dim, index + 1), make_perceptron(self.dim, n_classes)
        expert, router, perceptron = (m.to(reference.device, reference.dtype) for m in (expert, router, perceptron))
        if index > 1:
            # Release (reproduced on purpose): the mean runs over experts 0..m-2, leaving the most recent out.
            initialise_from_mean(expert, self._earlier_expert_sums(index - 1), index - 1)
        if index > 0:
            for module in (self.experts[-1], self.routers[-1], self.perceptrons[-1]):
                module.requires_grad_(False)
        self.experts.append(expert)
        self.routers.append(router)
        self.perceptrons.append(perceptron)
        self._shared_fold = None

    def _earlier_expert_sums(self, count: int) -> list[Tensor]:
        """Parameter sums of experts [0, count), all frozen: extended by the experts frozen since."""
        cached = self._expert_sums
        if cached is None or cached.count > count:
            cached = self._expert_sums = _ExpertSums(count, parameter_sums(list(self.experts)[:count]))
        for expert in list(self.experts)[cached.count:count]:
            add_parameters(cached.sums, expert)
        cached.count = count
        return cached.sums

    def trainable_parameters(self) -> list[nn.Parameter]:
        newest = [] if self.n_tasks == 0 else [self.experts[-1], self.routers[-1], self.perceptrons[-1]]
        return [p for module in (self.shared, *newest) for p in module.parameters()]

    # ---- shared-adapter anchoring ------------------------------------------------------------
    def set_anchor(self) -> None:
        self._anchor = [p.detach().clone() for p in self.shared.parameters()]

    def clear_anchor(self) -> None:
        self._anchor = None

    def anchor_state(self) -> dict[str, Tensor]:
        """The anchor by shared-adapter parameter name ({} when none is set)."""
        if self._anchor is None:
            return {}
        return {name: anchor for (name, _), anchor in zip(self.shared.named_parameters(), self._anchor)}

    def load_anchor_state(self, state: dict[str, Tensor]) -> None:
        if not state:
            self._anchor = None
            return
        names = [name for name, _ in self.shared.named_parameters()]
        if sorted(state) != sorted(names):
            raise KeyError(f"anchor state needs {names}, got {sorted(state)}")
        self._anchor = [state[name].detach().to(self.shared.scale.device, self.shared.scale.dtype).clone()
                        for name in names]

    @torch.no_grad()
    def _pull_shared_towards_anchor(self) -> None:
        momentum = self.config.anchor_momentum
        for parameter, anchor in zip(self.shared.parameters(), self._anchor):
            parameter.mul_(1.0 - momentum).add_(anchor, alpha=momentum)

    # ---- caches ------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Drop the frozen tables; call after editing frozen (older tasks') parameters in place."""
        self._bank = None
        self._shared_fold = None
        self._expert_sums = None

    def _current_bank(self) -> PartsBank:
        bank = self._bank
        if bank is None or not bank.matches(self.shared.scale) or bank.n_tasks > self.n_tasks:
            self._bank = PartsBank.build(list(self.experts), list(self.routers), list(self.perceptrons))
            self.bank_builds += 1
        elif bank.n_tasks < self.n_tasks:
            bank.extend(list(self.experts), list(self.routers), list(self.perceptrons))
        return self._bank

    def frozen_table_bytes(self) -> int:
        """Memory held by the folded tables (0 before the first forward), spare capacity included."""
        return 0 if self._bank is None else self._bank.nbytes()

    def _cached_shared_fold(self) -> FoldedAdapter:
        version = parameter_version(self.shared)
        if self._shared_fold is None or self._shared_fold[0] != version:
            with torch.inference_mode(False), torch.no_grad():
                self._shared_fold = (version, self.shared.fold())
        return self._shared_fold[1]

    def _forward_parts(self, n_experts: int) -> _ForwardParts:
        bank = self._current_bank()
        if torch.is_grad_enabled():
            # The newest expert/router/perceptron and the shared adapter run live: gradients reach them.
            n_stacked, shared = self.n_tasks - 1, self.shared.fold()
        else:
            bank.refresh_newest(self.experts[-1], self.routers[-1], self.perceptrons[-1])
            n_stacked, shared = self.n_tasks, self._cached_shared_fold()
        newest = self.experts[-1].fold() if n_experts > n_stacked else None
        return _ForwardParts(bank, n_stacked, shared, newest)

    def __getstate__(self) -> dict:
        # Copies and pickles leave the caches behind: they are rebuilt on first use.
        state = self.__dict__.copy()
        state.update(_bank=None, _shared_fold=None, _expert_sums=None)
        return state

    def _apply(self, fn, recurse=True):
        before = parameter_version(self)
        super()._apply(fn, recurse)
        # `.to(device)` on a module already there (the engine does it every task) keeps the tables.
        if parameter_version(self) != before:
            self.invalidate()
        if self._anchor is not None:
            self._anchor = [fn(anchor) for anchor in self._anchor]
        return self

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, tokens: Tensor, task: int | None = None) -> tuple[Tensor, Tensor | None]:
        """BRMoE(z_a) for block input z_a (B, N, C); plus H_task(c_task) (B, n_task) when task-known.

        task=None: task-free (all experts, M lowest-entropy routers); task=i: experts 0..i,
        router i forced plus the M-1 lowest-entropy routers among 0..i-1.
        """
        if self.training and self._anchor is not None:
            # Release: once per block per training forward, before the shared adapter is applied.
            self._pull_shared_towards_anchor()
        n_experts = self.n_tasks if task is None else task + 1
        parts = self._forward_parts(n_experts)
        hidden = self._experts_hidden_on_cls(tokens[:, 0], parts, n_experts)
        perceptron_logits = None if task is None else self.perceptrons[task](self._cls_output(hidden, task, parts))
        experts, weights = self._route(hidden, parts, task)
        return self._dispatch(tokens, experts, weights, parts), perceptron_logits

    def _experts_hidden_on_cls(self, cls: Tensor, parts: _ForwardParts, n_experts: int) -> Tensor:
        """h_i = ReLU(x̂·D_iᵀ + d_i) on the CLS token for every expert in use: (B, E, r)."""
        x = normalise(cls)
        hidden = []
        n_from_bank = min(n_experts, parts.n_stacked)
        if n_from_bank > 0:
            hidden.append(self._stacked_hidden(x, parts.bank.experts, n_from_bank))
        if parts.newest is not None:
            hidden.append(self._stacked_hidden(x, parts.newest.map(lambda t: t[None]), 1))
        return torch.cat(hidden, dim=1) if len(hidden) > 1 else hidden[0]

    def _stacked_hidden(self, x: Tensor, experts: FoldedAdapter, n: int) -> Tensor:
        """Hidden units of the first n stacked experts on vectors x (B, C): (B, n, r)."""
        _, rank, dim = experts.down.shape
        hidden = F.linear(x, experts.down[:n].reshape(n * rank, dim), experts.down_bias[:n].reshape(n * rank))
        return self.dropout(F.relu(hidden)).view(-1, n, rank)

    def _cls_output(self, hidden: Tensor, expert: int, parts: _ForwardParts) -> Tensor:
        """c_e = h_e·U_e + u_e (B, C): the full CLS output, for one expert only."""
        folded = parts.newest if parts.is_live(expert) else parts.bank.experts.map(lambda t: t[expert])
        return torch.addmm(folded.up_bias, hidden[:, expert], folded.up)

    def _route(self, hidden: Tensor, parts: _ForwardParts, task: int | None) -> tuple[Tensor, Tensor]:
        """(expert ids, weights), each (B, S) with S = M'·K' slots per sample."""
        batch, n_experts = hidden.shape[:2]
        if n_experts == 1:
            # A single expert (task-known task 0, or one task learned): E_0 + Ē, no router involved.
            ones = hidden.new_ones(batch, 1)
            zeros = torch.zeros_like(ones, dtype=torch.long)
            self._record(zeros, None, zeros[:, :, None], ones[:, :, None])
            return zeros, ones
        n_candidates = n_experts if task is None else task
        needs_choice = self.config.topk_routers > (0 if task is None else 1)
        with torch.no_grad():
            confidence = (self._perceptron_confidence(hidden[:, :n_candidates], parts) if needs_choice
                          else hidden.new_zeros(batch, 0))
        routers = select_routers(confidence, self.config.topk_routers, forced_router=task)
        scores = self._router_scores(hidden, routers, parts)
        experts, weights = expert_mixture(scores, self.config.topk_experts)
        self._record(routers, confidence if needs_choice else None, experts, weights)
        return experts.flatten(1), weights.flatten(1)

    def _record(self, routers: Tensor, confidence: Tensor | None, experts: Tensor, weights: Tensor) -> None:
        if self.routing_trace is not None:
            detached = None if confidence is None else confidence.detach()
            self.routing_trace.append(RoutingRecord(routers.detach(), detached, experts.detach(), weights.detach()))

    def _perceptron_confidence(self, hidden: Tensor, parts: _ForwardParts) -> Tensor:
        """-e_i = -entropy(H_i(c_i)) for the candidate routers (hidden (B, n, r)): (B, n)."""
        n = hidden.shape[1]
        n_from_bank = min(n, parts.n_stacked)
        h = hidden[:, :n_from_bank].transpose(0, 1)  # (n, B, r)
        inverse_sigma = self._inverse_cls_sigma(h, parts.bank)
        values = []
        for group in parts.bank.perceptron_groups:
            stop = min(group.stop, n_from_bank)
            if stop <= group.start:
                break
            count, rows = stop - group.start, slice(group.start, stop)
            centred = torch.baddbmm(group.offsets.data[:count, None, :], h[rows], group.products.data[:count])
            logits = centred * inverse_sigma[rows, :, None] + group.bias.data[:count, None, :]
            values.append(negative_entropy(logits))
        if n > n_from_bank:
            c_newest = self._cls_output(hidden, n - 1, parts)
            values.append(negative_entropy(self.perceptrons[n - 1](c_newest))[None])
        return (torch.cat(values) if len(values) > 1 else values[0]).t()

    def _inverse_cls_sigma(self, h: Tensor, bank: PartsBank) -> Tensor:
        """1 / sqrt(var(c_i) + eps) from the LayerNorm quadratic form, in float64: (n, B) in h's dtype."""
        quadratic, linear, constant = (t[: h.shape[0]] for t in bank.norm_tables)
        h64 = h.to(torch.float64)
        energy = (torch.baddbmm(linear[:, None, :], h64, quadratic) * h64).sum(-1) + constant[:, None]
        variance = energy.clamp_min(0.0) / self.dim
        return torch.rsqrt(variance + LAYER_NORM_EPS).to(h.dtype)

    def _router_scores(self, hidden: Tensor, routers: Tensor, parts: _ForwardParts) -> Tensor:
        """r = R_ρ(c_ρ) for each selected router ρ, -inf padded to the experts in use: (B, M', E)."""
        batch, n_routers = routers.shape
        n_experts = hidden.shape[1]
        selected = torch.gather(hidden, 1, routers[..., None].expand(-1, -1, hidden.shape[-1]))
        products, offsets = parts.bank.router_tables
        scores = packed_router_scores(selected.reshape(batch * n_routers, -1), products, offsets,
                                      routers.reshape(-1), n_experts).view(batch, n_routers, n_experts)
        if parts.newest is not None:
            # The newest router is live (trainable) and scores every expert: applied directly.
            newest = self.routers[-1]
            live = F.linear(self._cls_output(hidden, parts.newest_index, parts), newest.weight, newest.bias)
            scores = torch.where((routers == parts.newest_index)[..., None], live[:, None, :], scores)
        return scores

    def _dispatch(self, tokens: Tensor, experts: Tensor, weights: Tensor, parts: _ForwardParts) -> Tensor:
        """Ē(x) + Σ_s w_s E_{e_s}(x) as two batched matmuls over the (shared + S slots) bottlenecks."""
        batch, _, dim = tokens.shape
        slots = experts.shape[1]
        chosen = self._gather_experts(experts, parts)
        rank = chosen.down.shape[-2]
        shared = parts.shared
        width = shared.down.shape[0]
        weights = weights.to(chosen.up.dtype)
        down = torch.cat([shared.down.expand(batch, width, dim), chosen.down.reshape(batch, slots * rank, dim)], 1)
        down_bias = torch.cat([shared.down_bias.expand(batch, width), chosen.down_bias.reshape(batch, slots * rank)], 1)
        weighted_up = (chosen.up * weights[..., None, None]).reshape(batch, slots * rank, dim)
        up = torch.cat([shared.up.expand(batch, width, dim), weighted_up], 1)
        up_bias = shared.up_bias + (chosen.up_bias * weights[..., None]).sum(1)
        hidden = torch.baddbmm(down_bias[:, None, :], normalise(tokens), down.transpose(1, 2))
        # Training only: dropout masks here are drawn independently of the routing pass's (the release reuses one per expert).
        hidden = self.dropout(F.relu(hidden))
        self.last_token_expert_runs = batch * slots
        return torch.baddbmm(up_bias[:, None, :], hidden, up)

    def _gather_experts(self, experts: Tensor, parts: _ForwardParts) -> FoldedAdapter:
        """Folded weights of each slot's expert: down (B, S, r, C), down_bias (B, S, r), ..."""
        gathered = parts.bank.experts.map(lambda t: t[experts])
        if parts.newest is None:
            return gathered
        is_newest = experts == parts.newest_index
        return FoldedAdapter(*(
            torch.where(is_newest.view(*is_newest.shape, *[1] * (live.dim())), live, stacked)
            for live, stacked in zip(parts.newest.astuple(), gathered.astuple())
        ))


def _invalidate_after_load(module: BRMoELayer, incompatible_keys) -> None:
    module.invalidate()
