"""Typed parallelism configuration (Hydra fills it in `train/`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """How a model built by `moe/` is spread over ranks.

    mode: "dp" (everything replicated), "ep" (each MoE layer's experts split over groups of
        ep_size ranks, tokens moved by all-to-all; ep_size=world gives pure EP, smaller gives
        EP+DP) or "fssdp" (Hecate: every expert sharded over all ranks, only the experts this
        step activates are gathered, and only their gradients reduce-scattered).
    dense: engine for non-expert parameters: "ddp" (torch DDP), "fsdp2" (fully_shard) or
        "deepspeed" (a DeepSpeed engine with ZeRO stage zero_stage over the dense parameters;
        experts keep their own optimizer).
    rematerialize: FSSDP frees gathered experts after forward and gathers them again in
        backward (less memory, twice the all-gather bytes).
    timeout_s: collective timeout; a rank that dies ends the others within it, named.
    """

    mode: str = "dp"
    ep_size: int = 0  # 0: all ranks
    dense: str = "ddp"
    rematerialize: bool = False
    zero_stage: int = 2
    timeout_s: float = 300.0
    backend: str = "auto"  # "auto": nccl on CUDA, gloo on CPU

    def check(self, world_size: int) -> None:
        if self.mode not in ("dp", "ep", "fssdp"):
            raise ValueError(f"parallel mode must be dp, ep or fssdp, got {self.mode!r}")
        if self.dense not in ("ddp", "fsdp2", "deepspeed"):
            raise ValueError(
                f"parallel dense engine must be ddp, fsdp2 or deepspeed, got {self.dense!r}"
            )
        if self.zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2 (experts are sharded by FSSDP/EP), "
                             f"got {self.zero_stage}")
        ep = self.ep_size or world_size
        if world_size % ep:
            raise ValueError(f"ep_size={ep} does not divide the world size {world_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
