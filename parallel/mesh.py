"""The device mesh from the torchrun environment: (dp, ep) groups, backend, timeout, watchdog."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig
from parallel.watchdog import Watchdog

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Mesh:
    """This rank's place in a (dp, ep) mesh. ep_group: ranks that split one copy of the experts;
    expert_dp_group: ranks holding the same experts (one per EP replica)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_size: int
    ep_size: int
    device_mesh: DeviceMesh  # 1-D over all ranks, for FSDP2 on the dense parameters
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup
    expert_group: dist.ProcessGroup  # all ranks, for FSSDP's sparse collectives
    cfg: ParallelConfig
    watchdog: Watchdog

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)

    @contextlib.contextmanager
    def guard(self):
        """Turn a collective that fails because a peer died into a message naming that peer."""
        try:
            yield
        except Exception as e:
            failed = self.watchdog.wait_for_failure()
            if failed:
                self.watchdog.fail(failed, f"rank {self.rank}: rank(s) {failed} failed; a "
                                   f"collective here raised {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}")
            raise

    def close(self) -> None:
        self.watchdog.stop()
        dist.destroy_process_group()


def init_distributed(cfg: ParallelConfig | None = None) -> Mesh:
    """Read RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (set by torchrun) and
    join the process group: NCCL on GPUs, gloo on CPUs, with cfg.timeout_s on collectives."""
    cfg = cfg or ParallelConfig()
    missing = [k for k in REQUIRED_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"distributed run needs {', '.join(missing)} in the environment "
            "(start it with torchrun --nproc-per-node N ...)"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg.check(world)
    use_cuda = torch.cuda.is_available() and cfg.backend in ("auto", "nccl")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.timeout_s))
    ep = cfg.ep_size or world
    dp = world // ep
    dm = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
    # MoE collectives get groups of their own, apart from the dense engine's (DDP / FSDP2
    # reduce on the default group while experts all-to-all or reduce-scatter in backward).
    # Rank = dp_index * ep + ep_index; every rank creates every group, in the same order.
    ep_group = expert_dp_group = None
    for i in range(dp):
        g = dist.new_group([i * ep + j for j in range(ep)])
        if rank // ep == i:
            ep_group = g
    for j in range(ep):
        g = dist.new_group([i * ep + j for i in range(dp)])
        if rank % ep == j:
            expert_dp_group = g
    expert_group = dist.new_group(list(range(world)))
    store = dist.distributed_c10d._get_default_store()
    watchdog = Watchdog(store, rank, world, cfg.timeout_s).start()
    return Mesh(rank=rank, world_size=world, local_rank=local_rank, device=device,
                dp_size=dp, ep_size=ep, device_mesh=dm, ep_group=ep_group,
                expert_dp_group=expert_dp_group, expert_group=expert_group, cfg=cfg,
                watchdog=watchdog)
