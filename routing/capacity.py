"""Expert capacity and token dropping."""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots an expert keeps: ceil(capacity_factor * T * k / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def count_per_expert(expert_ids: torch.Tensor, num_experts: int,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """expert_ids [...] in [0, num_experts), keep [...] bool (None: all) -> [num_experts]
    int64 slots per expert. A scatter-add: unlike torch.bincount (which reads the largest id
    back to the host on CUDA) or boolean indexing, it never waits for the device."""
    ones = torch.ones_like(expert_ids, dtype=torch.int64) if keep is None else keep.long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    return counts.scatter_add_(0, expert_ids.reshape(-1), ones.reshape(-1))


def capacity_drop_mask(
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str = "position",
    skip: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """expert_ids [T, k], weights [T, k] -> dropped [T, k] bool.

    Within each expert, slots are ranked by priority and those past ``capacity`` are dropped.
    "position": every token's first choice outranks any second choice, then earlier tokens
    outrank later ones (GShard / Switch). "probs": higher weight first, ties by position.
    skip [T, k] bool: slots that take no capacity (left empty by the router); never dropped.
    The ranks come from the stable counting sort by expert that dispatch uses (the kernels'
    backend: Triton kernels on CUDA): a slot's rank is its sorted row less its expert's first.
    """
    from kernels import sort_by_expert

    if policy not in ("position", "probs"):
        raise ValueError(f"drop_policy must be position or probs, got {policy!r}")
    T, k = expert_ids.shape
    # Slot (t, j) in slot-major order: index j * T + t
    flat_e = expert_ids.t().reshape(-1, 1)
    flat_skip = None if skip is None else skip.t().reshape(-1, 1)
    order = None
    if policy == "probs":  # priority order: higher weight first, ties by position
        order = torch.argsort(-weights.detach().t().reshape(-1), stable=True)
        flat_e = flat_e[order]
        flat_skip = None if flat_skip is None else flat_skip[order]
    # skipped slots are sorted into bucket E, after every expert's: they rank nowhere
    d = sort_by_expert(flat_e, num_experts, flat_skip, backend)
    rank = d.slot_rows - d.expert_offsets[flat_e[:, 0]]
    lost = rank >= capacity
    if flat_skip is not None:
        lost &= ~flat_skip[:, 0]
    if order is not None:
        lost = torch.empty_like(lost).scatter_(0, order, lost)
    return lost.view(k, T).t()
