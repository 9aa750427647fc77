"""Differentiable collectives that count their bytes: all-to-all with uneven splits, and the
sparse all-gather / reduce-scatter of FSSDP."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives (the old names warn on every call); older
# torch (e.g. 2.11 on a GPU machine) has only the old ones.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommCounters:
    """Bytes this rank moved per collective since the last reset (one step, for logging).

    all_to_all: bytes sent to other ranks plus bytes received from them; all_gather: bytes of
    the gathered tensor; reduce_scatter: bytes of the tensor reduced; all_reduce: its bytes.
    """

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        # Host seconds inside each collective: the wire time on gloo (synchronous); on NCCL
        # only the launch, so time GPU runs with events instead.
        self.seconds: dict[str, float] = defaultdict(float)
        self.expert_rows = 0  # (token, expert) rows this rank's experts computed, fwd

    def add(self, name: str, nbytes: int, seconds: float = 0.0) -> None:
        self.bytes[name] += int(nbytes)
        self.calls[name] += 1
        self.seconds[name] += seconds

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.seconds.clear()
        self.expert_rows = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes)


class SumOverRanks:
    """t -> t summed over the group's ranks (an all-reduce on a copy), its bytes counted under
    name: what a router's global-batch aux loss sums its expert counts with."""

    def __init__(self, group: dist.ProcessGroup | None, counters: CommCounters, name: str):
        self.group, self.counters, self.name = group, counters, name

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        self.counters.add(self.name, _nbytes(t))
        return t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup, counters: CommCounters | None, name: str) -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]; rows to rank r are a contiguous
    block. Differentiable: the backward is the reverse all-to-all."""
    return _AllToAll.apply(x, send_splits, recv_splits, group, counters, name)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, counters, name):
        ctx.meta = (send_splits, recv_splits, group, counters, name)
        return _a2a(x, send_splits, recv_splits, group, counters, name)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits, group, counters, name = ctx.meta
        dx = _a2a(grad.contiguous(), recv_splits, send_splits, group, counters, name + ".bwd")
        return dx, None, None, None, None, None


def _a2a(x, send_splits, recv_splits, group, counters, name):
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    elapsed = time.perf_counter() - t0
    if counters is not None:
        me = dist.get_rank(group)
        row = x.element_size() * math.prod(x.shape[1:])
        moved = sum(s for r, s in enumerate(send_splits) if r != me)
        moved += sum(s for r, s in enumerate(recv_splits) if r != me)
        counters.add(name, moved * row, elapsed)
    return out


def sparse_all_gather(shard: torch.Tensor, idx: torch.Tensor, group: dist.ProcessGroup,
                      counters: CommCounters | None, name: str,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """shard [E, s] (this rank's slice of every expert), idx [m] active experts ->
    full [m, W * s]: the m experts' whole flattened weights. Backward: reduce-scatter of their
    gradients to the shard owners (summed over ranks); inactive experts get zero, move nothing.
    dtype (mixed precision): the weights are gathered in it (bf16: half float32's bytes), and
    their gradients are reduced in the shard's dtype."""
    return _SparseAllGather.apply(shard, idx, group, counters, name, dtype or shard.dtype)


class _SparseAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, idx, group, counters, name, dtype):
        W = dist.get_world_size(group)
        m, s = idx.numel(), shard.shape[1]
        ctx.meta = (idx, shard.shape, group, counters, name)
        ctx.shard_dtype = shard.dtype
        if m == 0:
            return shard.new_zeros(0, W * s, dtype=dtype)
        send = shard.index_select(0, idx).to(dtype).contiguous()
        out = send.new_empty(W * m, s)
        t0 = time.perf_counter()
        all_gather_flat(out, send, group=group)
        if counters is not None:
            counters.add(name + ".all_gather", _nbytes(out), time.perf_counter() - t0)
        return out.view(W, m, s).transpose(0, 1).reshape(m, W * s)

    @staticmethod
    def backward(ctx, grad):
        idx, shape, group, counters, name = ctx.meta
        W = dist.get_world_size(group)
        m, s = idx.numel(), shape[1]
        dshard = grad.new_zeros(shape, dtype=ctx.shard_dtype)
        if m == 0:
            return dshard, None, None, None, None, None
        grad = grad.to(ctx.shard_dtype)  # summed over ranks in the shard's precision
        send = grad.reshape(m, W, s).transpose(0, 1).contiguous()  # [W, m, s]: block r to rank r
        out = grad.new_empty(m, s)
        t0 = time.perf_counter()
        reduce_scatter_flat(out, send.view(W * m, s), op=dist.ReduceOp.SUM, group=group)
        if counters is not None:
            counters.add(name + ".reduce_scatter", _nbytes(send), time.perf_counter() - t0)
        dshard.index_copy_(0, idx, out)
        return dshard, None, None, None, None, None
