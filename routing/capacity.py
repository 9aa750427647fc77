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
) -> torch.Tensor:
    """expert_ids [T, k], weights [T, k] -> dropped [T, k] bool.

    Within each expert, slots are ranked by priority and those past ``capacity`` are dropped.
    "position": every token's first choice outranks any second choice, then earlier tokens
    outrank later ones (GShard / Switch). "probs": higher weight first, ties by position.
    skip [T, k] bool: slots that take no capacity (left empty by the router); never dropped.
    """
    T, k = expert_ids.shape
    # Slot (t, j) in slot-major order: index j * T + t; skipped slots go to a bucket E of their own
    flat_e = expert_ids if skip is None else expert_ids.masked_fill(skip, num_experts)
    flat_e = flat_e.t().reshape(-1)
    n = flat_e.numel()
    if policy == "position":
        order = torch.arange(n, device=flat_e.device)
    elif policy == "probs":
        order = torch.argsort(-weights.detach().t().reshape(-1), stable=True)
    else:
        raise ValueError(f"drop_policy must be position or probs, got {policy!r}")
    by_expert = order[torch.argsort(flat_e[order], stable=True)]  # expert-major, priority within
    counts = count_per_expert(flat_e, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    e_sorted = flat_e[by_expert]
    rank = torch.arange(n, device=flat_e.device) - starts[e_sorted]
    dropped_flat = torch.empty(n, dtype=torch.bool, device=flat_e.device)
    dropped_flat[by_expert] = (rank >= capacity) & (e_sorted < num_experts)
    return dropped_flat.view(k, T).t()
