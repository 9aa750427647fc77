"""Where each local parameter lives in the single-process ("canonical") state dict, so that
weights and optimizer state are saved once in one layout and loaded on any number of ranks
or in any parallel mode."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class Layout:
    """Identity: a replicated (or FSDP2-sharded DTensor) parameter keeps its name."""

    def __init__(self, name: str):
        self.names = [name]

    def to_canonical(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        return {self.names[0]: t.detach()}

    def from_canonical(self, full: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        t = full[self.names[0]]
        if hasattr(like, "device_mesh"):  # DTensor: take this rank's piece
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements)
        return t


class EPLayout(Layout):
    """Local experts [E / P, ...] of an EP group <-> all experts [E, ...]."""

    def __init__(self, name: str, group: dist.ProcessGroup):
        super().__init__(name)
        self.group = group

    def to_canonical(self, t):
        P = dist.get_world_size(self.group)
        parts = [torch.empty_like(t) for _ in range(P)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return {self.names[0]: torch.cat(parts)}

    def from_canonical(self, full, like):
        t = full[self.names[0]]
        r = dist.get_rank(self.group)
        n = like.shape[0]
        return t[r * n:(r + 1) * n]


class FSSDPLayout(Layout):
    """FSSDP shard [E, s] <-> (w_in [E, ...], w_out [E, ...], and the biases if any)."""

    def __init__(self, prefix: str, experts: nn.Module):
        self.prefix = prefix
        self.names = [prefix + n for n in experts.names]
        self.experts = experts

    def to_canonical(self, t):
        return {self.prefix + n: w for n, w in self.experts.unshard(t.detach()).items()}

    def from_canonical(self, full, like):
        return self.experts.reshard({n: full[self.prefix + n] for n in self.experts.names})
