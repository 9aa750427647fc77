"""Sort (token, slot) pairs by expert once; every grouped op reads through this order."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Dispatch:
    """T tokens x k slots = M pairs, sorted by expert.

    Rows [0, expert_offsets[E]) are the kept pairs, expert-contiguous, in slot order within an
    expert; the remaining rows are dropped pairs (expert id E) that no kernel reads or writes.
    """

    sorted_pair_idx: torch.Tensor  # [M] int64: slot index t * k + j of each sorted row
    sorted_token_idx: torch.Tensor  # [M] int64: token t of each sorted row
    sorted_expert_idx: torch.Tensor  # [M] int64: expert of each sorted row (E if dropped)
    expert_offsets: torch.Tensor  # [E + 1] int64: rows of expert e are [off[e], off[e + 1])
    num_tokens: int
    top_k: int
    num_experts: int
    may_drop: bool = False  # built with a dropped mask: slot-order outputs must be zero-filled
    slot_rows: torch.Tensor | None = None  # [M] int64: sorted row of each slot t * k + j
    cache: dict = field(default_factory=dict, repr=False)  # backend schedules keyed by kind

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[E] int64 rows per expert."""
        return self.expert_offsets.diff()


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int, dropped: torch.Tensor | None = None,
    backend: str = "auto",
) -> Dispatch:
    """expert_ids [T, k] (and dropped [T, k] bool) -> Dispatch sorted by expert (stable)."""
    from kernels.backend import get_backend

    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    if dropped is not None:
        flat = flat.masked_fill(dropped.reshape(-1), num_experts)
    pair_idx, token_idx, sorted_expert, offsets, slot_rows = get_backend(
        backend, flat.device).sort_pairs(flat, num_experts, k)
    return Dispatch(
        sorted_pair_idx=pair_idx,
        sorted_token_idx=token_idx,
        sorted_expert_idx=sorted_expert,
        expert_offsets=offsets,
        num_tokens=T,
        top_k=k,
        num_experts=num_experts,
        may_drop=dropped is not None,
        slot_rows=slot_rows,
    )
