"""parallelize(model, mesh): EP or FSSDP for the experts, DDP or FSDP2 for everything else."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.comm import CommCounters
from parallel.expert_parallel import apply_expert_parallel
from parallel.fssdp import apply_fssdp
from parallel.mesh import Mesh


@dataclass
class Parallelized:
    """module: call it for forward (wrapped); model: the underlying `moe` model (its MoE layers
    now hold local experts or shards); after_backward(): finish the expert gradients."""

    module: nn.Module
    model: nn.Module
    mesh: Mesh
    counters: CommCounters
    expert_params: list[nn.Parameter] = field(default_factory=list)

    def after_backward(self) -> None:
        """Average expert gradients like DDP averages the rest (mean of the ranks' losses).

        EP: a local expert's gradient already sums every rank's tokens; replicas across the
        expert-DP group are summed too. FSSDP: the sparse reduce-scatter summed them.
        """
        mode, W = self.mesh.cfg.mode, self.mesh.world_size
        if mode == "dp" or not self.expert_params:
            return
        grads = [p.grad for p in self.expert_params if p.grad is not None]
        if mode == "ep" and self.mesh.dp_size > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.mesh.expert_dp_group)
            self.counters.add("expert_dp.all_reduce", flat.numel() * flat.element_size())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        for g in grads:
            g.div_(W)


    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process state dict (same names as the unwrapped model), on every rank."""
        from moe.layer import MoELayer
        from parallel.fssdp import FSSDPExperts

        state = {}
        for name, t in self.model.state_dict().items():
            if hasattr(t, "full_tensor"):  # FSDP2 DTensor
                t = t.full_tensor()
            state[name] = t.detach()
        for name, module in self.model.named_modules():
            if not isinstance(module, MoELayer):
                continue
            prefix = f"{name}.experts." if name else "experts."
            if isinstance(module.experts, FSSDPExperts):
                state.pop(prefix + "shard")
                w_in, w_out = module.experts.full_weights()
            elif self.mesh.cfg.mode == "ep":
                w_in, w_out = (_gather_cat(getattr(module.experts, n).detach(), self.mesh.ep_group)
                               for n in ("w_in", "w_out"))
            else:
                continue
            state[prefix + "w_in"], state[prefix + "w_out"] = w_in, w_out
        return state


def _gather_cat(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out)


def parallelize(model: nn.Module, mesh: Mesh) -> Parallelized:
    """Wrap a model built by `moe/` for mesh.cfg.mode ("dp", "ep", "fssdp") and mesh.cfg.dense."""
    cfg = mesh.cfg
    counters = CommCounters()
    model = model.to(mesh.device)
    expert_params: list[nn.Parameter] = []
    if cfg.mode == "ep":
        expert_params = apply_expert_parallel(model, mesh.ep_group, counters)
    elif cfg.mode == "fssdp":
        expert_params = apply_fssdp(model, mesh.expert_group, counters, cfg.rematerialize)
    ignored = {id(p) for p in expert_params}
    if mesh.world_size == 1:
        module = model
    elif cfg.dense == "ddp":
        names = [n for n, p in model.named_parameters() if id(p) in ignored]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        # Buffers (router expert bias, hash tables) stay in step by construction: no per-step
        # broadcast (the keyword was renamed in newer torch).
        sync_kw = ("forward_sync_buffers" if "forward_sync_buffers"
                   in inspect.signature(DistributedDataParallel.__init__).parameters
                   else "broadcast_buffers")
        module = DistributedDataParallel(
            model, device_ids=[mesh.device] if mesh.device.type == "cuda" else None,
            **{sync_kw: False})
    else:
        from torch.distributed.fsdp import fully_shard

        ignored_params = set(expert_params)
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=mesh.device_mesh, ignored_params=ignored_params)
        fully_shard(model, mesh=mesh.device_mesh, ignored_params=ignored_params)
        module = model
    return Parallelized(module=module, model=model, mesh=mesh, counters=counters,
                        expert_params=expert_params)
