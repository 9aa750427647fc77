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
from kernels.device import autocast_dtype
from moe.experts import EXPERT_PARAMS, Experts, expert_mlp
from moe.layer import MoELayer
from parallel.comm import CommCounters, all_gather_flat, sparse_all_gather


class FSSDPExperts(nn.Module):
    """Drop-in for `moe.experts.Experts`: shard [E, s] holds this rank's 1/W of each expert's
    flattened parameters (w_in, w_out, and b_in, b_out when the experts have biases);
    forward gathers the active experts and runs the grouped MLP."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup, counters: CommCounters,
                 name: str, rematerialize: bool = False):
        super().__init__()
        self.group, self.counters, self.name = group, counters, name
        self.rematerialize = rematerialize
        self.kind, self.backend = experts.kind, experts.backend
        self.alpha, self.limit = experts.alpha, experts.limit
        self.recompute_act = experts.recompute_act  # set by set_activation_checkpointing
        self.num_experts, self.d_model, self.ffn = experts.num_experts, experts.d_model, experts.ffn
        self.names = [n for n in EXPERT_PARAMS if getattr(experts, n) is not None]
        self.shapes = [tuple(getattr(experts, n).shape[1:]) for n in self.names]
        n = sum(_numel(shape) for shape in self.shapes)
        W, r = dist.get_world_size(group), dist.get_rank(group)
        self.shard_len = -(-n // W)
        with torch.no_grad():
            flat = torch.cat([getattr(experts, p).flatten(1) for p in self.names], dim=1)
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

    def forward(self, x: torch.Tensor, d: Dispatch, y_grouped: bool = True,
                combine_weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d] token order -> y [M, d], or with combine_weights [T, k] -> [T, d]: same
        contract as Experts.forward."""
        idx = self.active_experts(d)
        self.counters.expert_rows += int(d.expert_offsets[-1])
        compact = _compact_dispatch(d, idx)
        if self.rematerialize and torch.is_grad_enabled():
            return checkpoint(self._gather_and_run, self.shard, x, idx, compact, y_grouped,
                              combine_weights, use_reentrant=False)
        return self._gather_and_run(self.shard, x, idx, compact, y_grouped, combine_weights)

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """flat [m, >= n] (an expert's parameters end to end, padded) -> name -> [m, ...]."""
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            out[name] = flat[:, at:at + _numel(shape)].reshape(flat.shape[0], *shape)
            at += _numel(shape)
        return out

    def _gather_and_run(self, shard, x, idx, compact, y_grouped, combine_weights=None):
        w = self._split(sparse_all_gather(shard, idx, self.group, self.counters, self.name,
                                          autocast_dtype(x)))
        return expert_mlp(x, w["w_in"], w["w_out"], compact, self.kind, self.backend,
                          y_grouped, w.get("b_in"), w.get("b_out"), self.alpha, self.limit,
                          self.recompute_act, combine_weights)

    def unshard(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """A tensor laid out like the shard [E, s] (the weights, or an optimizer moment) ->
        the whole experts' parameters by name (w_in-like, w_out-like, ...), on every rank."""
        W = dist.get_world_size(self.group)
        out = t.new_empty(W * self.num_experts, self.shard_len)
        all_gather_flat(out, t.contiguous(), group=self.group)
        flat = out.view(W, self.num_experts, self.shard_len).transpose(0, 1).reshape(
            self.num_experts, -1)
        return self._split(flat)

    def reshard(self, full: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of unshard: the whole parameters by name -> this rank's [E, s] slice."""
        W, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        flat = torch.cat([full[n].reshape(self.num_experts, -1) for n in self.names], dim=1)
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
                    may_drop=d.may_drop, slot_rows=d.slot_rows)


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
