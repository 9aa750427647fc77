"""Fully sharded sparse data parallelism (Hecate): every expert's parameters, gradients and
optimizer state are sharded over the group; a step gathers only the experts its tokens
activate anywhere in the group (SparseAllGather) and reduce-scatters only their gradients
(SparseReduceScatter). Tokens never leave their rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import Dispatch
from moe.experts import Experts, expert_mlp
from moe.layer import MoELayer
from parallel.comm import CommCounters, sparse_all_gather


class FSSDPExperts(nn.Module):
    """Drop-in for `moe.experts.Experts`: shard [E, s] holds this rank's 1/W of each expert's
    flattened (w_in, w_out); forward gathers the active experts and runs the grouped MLP."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup, counters: CommCounters,
                 name: str, rematerialize: bool = False):
        super().__init__()
        self.group, self.counters, self.name = group, counters, name
        self.rematerialize = rematerialize
        self.kind, self.backend = experts.kind, experts.backend
        self.num_experts, self.d_model, self.ffn = experts.num_experts, experts.d_model, experts.ffn
        self.in_shape = tuple(experts.w_in.shape[1:])
        self.out_shape = tuple(experts.w_out.shape[1:])
        self.n_in = experts.w_in[0].numel()
        n = self.n_in + experts.w_out[0].numel()
        W, r = dist.get_world_size(group), dist.get_rank(group)
        self.shard_len = -(-n // W)
        with torch.no_grad():
            flat = torch.cat([experts.w_in.flatten(1), experts.w_out.flatten(1)], dim=1)
            flat = nn.functional.pad(flat, (0, self.shard_len * W - n))
            shard = flat.view(self.num_experts, W, self.shard_len)[:, r].clone()
        self.shard = nn.Parameter(shard)

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    def active_experts(self, d: Dispatch) -> torch.Tensor:
        """[m] int64: experts with at least one token on any rank of the group, ascending."""
        active = (d.tokens_per_expert > 0).to(torch.int32)
        dist.all_reduce(active, op=dist.ReduceOp.MAX, group=self.group)
        self.counters.add(self.name + ".active_mask", active.numel() * active.element_size())
        return active.nonzero().view(-1)

    def forward(self, x: torch.Tensor, d: Dispatch, y_grouped: bool = True) -> torch.Tensor:
        """x [T, d] token order -> y [M, d]: same contract as Experts.forward."""
        idx = self.active_experts(d)
        self.counters.expert_rows += int(d.expert_offsets[-1])
        compact = _compact_dispatch(d, idx)
        if self.rematerialize and torch.is_grad_enabled():
            return checkpoint(self._gather_and_run, self.shard, x, idx, compact, y_grouped,
                              use_reentrant=False)
        return self._gather_and_run(self.shard, x, idx, compact, y_grouped)

    def _gather_and_run(self, shard, x, idx, compact, y_grouped):
        full = sparse_all_gather(shard, idx, self.group, self.counters, self.name)
        m = idx.numel()
        w_in = full[:, : self.n_in].view(m, *self.in_shape)
        w_out = full[:, self.n_in : self.n_in + _numel(self.out_shape)].view(m, *self.out_shape)
        return expert_mlp(x, w_in, w_out, compact, self.kind, self.backend, y_grouped)

    def unshard(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A tensor laid out like the shard [E, s] (the weights, or an optimizer moment) ->
        the whole (w_in-like, w_out-like) pair, on every rank."""
        W = dist.get_world_size(self.group)
        out = t.new_empty(W * self.num_experts, self.shard_len)
        dist.all_gather_into_tensor(out, t.contiguous(), group=self.group)
        flat = out.view(W, self.num_experts, self.shard_len).transpose(0, 1).reshape(
            self.num_experts, -1)
        w_in = flat[:, : self.n_in].reshape(self.num_experts, *self.in_shape)
        w_out = flat[:, self.n_in : self.n_in + _numel(self.out_shape)].reshape(
            self.num_experts, *self.out_shape)
        return w_in, w_out

    def reshard(self, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """Inverse of unshard: whole (w_in-like, w_out-like) -> this rank's [E, s] slice."""
        W, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        flat = torch.cat([w_in.reshape(self.num_experts, -1),
                          w_out.reshape(self.num_experts, -1)], dim=1)
        flat = nn.functional.pad(flat, (0, self.shard_len * W - flat.shape[1]))
        return flat.view(self.num_experts, W, self.shard_len)[:, r].clone()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _compact_dispatch(d: Dispatch, idx: torch.Tensor) -> Dispatch:
    """The same sorted rows, with experts renumbered 0..m-1 over the active ones (inactive
    experts have no rows anywhere, so the active experts' rows stay contiguous)."""
    E = d.num_experts
    remap = torch.full((E + 1,), idx.numel(), dtype=torch.int64, device=idx.device)
    remap[idx] = torch.arange(idx.numel(), device=idx.device)
    offsets = torch.cat([d.expert_offsets[idx], d.expert_offsets[-1:]])
    return Dispatch(sorted_pair_idx=d.sorted_pair_idx, sorted_token_idx=d.sorted_token_idx,
                    sorted_expert_idx=remap[d.sorted_expert_idx], expert_offsets=offsets,
                    num_tokens=d.num_tokens, top_k=d.top_k, num_experts=idx.numel(),
                    may_drop=d.may_drop)


def apply_fssdp(model: nn.Module, group: dist.ProcessGroup, counters: CommCounters,
                rematerialize: bool = False) -> list[nn.Parameter]:
    """Shard every MoE layer's experts over `group`; returns the shard parameters."""
    params = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            module.experts = FSSDPExperts(module.experts, group, counters, name or "moe",
                                          rematerialize)
            params.append(module.experts.shard)
    return params
