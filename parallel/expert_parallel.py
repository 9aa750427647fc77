"""Expert parallelism: each rank of an EP group owns E / P experts of every MoE layer; tokens
travel to their expert's rank by all-to-all (counts exchanged first) and come back."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kernels import sort_by_expert, weighted_combine
from moe.experts import EXPERT_PARAMS, Experts
from moe.layer import MoELayer
from parallel.comm import CommCounters, all_to_all
from routing import Routing


class EPDispatch(nn.Module):
    """Stands in for `moe.layer.LocalDispatch` in an MoE layer whose experts are split over
    `group`: x [T, d], routing over all E experts -> [T, d]."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, counters: CommCounters,
                 name: str):
        super().__init__()
        self.group, self.counters, self.name = group, counters, name
        self.P = dist.get_world_size(group)
        self.E = num_experts
        self.E_local = num_experts // self.P

    def forward(self, x: torch.Tensor, routing: Routing, experts: nn.Module, may_drop: bool,
                backend: str) -> torch.Tensor:
        T, k = routing.expert_ids.shape
        d = sort_by_expert(routing.expert_ids, self.E, routing.dropped if may_drop else None)
        n = int(d.expert_offsets[-1])
        # Rows for (destination rank p, its local expert j), in that order: experts are
        # contiguous per rank, so the sorted rows already form one block per destination.
        send_counts = d.tokens_per_expert.view(self.P, self.E_local).contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        self.counters.add(self.name + ".counts", 2 * send_counts.numel() * 8 * (self.P - 1)
                          // self.P)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        x_send = x.index_select(0, d.sorted_token_idx[:n])
        x_recv = all_to_all(x_send, send_splits, recv_splits, self.group, self.counters,
                            self.name + ".dispatch")
        # each row's combine weight travels with it (4 bytes a row): the experts apply it,
        # and give its gradient, so no expert output y is kept here for the backward
        w_send = routing.combine_weights.reshape(-1).index_select(0, d.sorted_pair_idx[:n])
        w_recv = all_to_all(w_send[:, None], send_splits, recv_splits, self.group,
                            self.counters, self.name + ".weights")
        # Received rows: blocks by source rank, inside each by local expert.
        local_ids = torch.repeat_interleave(
            torch.arange(self.E_local, device=x.device).repeat(self.P), recv_counts.reshape(-1)
        )
        self.counters.expert_rows += x_recv.shape[0]
        ld = sort_by_expert(local_ids[:, None], self.E_local)
        # each received row as a token of one slot: weight * its expert's output, in
        # received order (SwiGLU experts keep no y; their weights' gradient from an epilogue)
        y_recv = experts(x_recv, ld, combine_weights=w_recv)
        y_back = all_to_all(y_recv, recv_splits, send_splits, self.group, self.counters,
                            self.name + ".combine")
        y = torch.cat([y_back, y_back.new_zeros(T * k - n, y_back.shape[1])])
        # sum each token's weighted rows (weights of one: nothing kept for the backward)
        ones = torch.ones_like(routing.combine_weights)
        return weighted_combine(y, ones, d, y_grouped=True, backend=backend)


def shard_experts_for_ep(layer: MoELayer, group: dist.ProcessGroup) -> Experts:
    """A new `Experts` holding this rank's E / P experts of `layer` (copied from it)."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    full = layer.experts
    E = full.num_experts
    if E % P:
        raise ValueError(f"num_experts={E} is not divisible by the EP group size {P}")
    E_local = E // P
    local = Experts(E_local, full.d_model, full.ffn, full.kind, full.backend,
                    full.b_in is not None, full.alpha, full.limit)
    local.recompute_act = full.recompute_act
    with torch.no_grad():
        for name in EXPERT_PARAMS:
            if getattr(full, name) is not None:
                getattr(local, name).copy_(getattr(full, name)[r * E_local:(r + 1) * E_local])
    return local.to(full.w_in.device, full.w_in.dtype)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup,
                          counters: CommCounters) -> list[nn.Parameter]:
    """Split every MoE layer's experts over `group`; returns the (now local) expert params."""
    params = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            module.experts = shard_experts_for_ep(module, group)
            module.dispatch = EPDispatch(group, module.cfg.num_experts, counters, name or "moe")
            params += list(module.experts.parameters())
    return params
