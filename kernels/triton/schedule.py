"""Block schedule: which expert and which first row each BLOCK_M-row program handles.

Computed on the device from the dispatch offsets (no host sync); the grid is sized by the upper
bound cdiv(M, BLOCK_M) + E, and programs past the real block count see expert E and exit.
"""

from __future__ import annotations

import torch

from kernels.dispatch import Dispatch


def block_schedule(d: Dispatch, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dispatch -> (block_expert [G] int64, block_row [G] int64, G) for BLOCK_M-row programs."""
    cache = d.cache
    if block_m in cache:
        return cache[block_m]
    counts = d.tokens_per_expert
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)  # [E]
    grid = (d.num_pairs + block_m - 1) // block_m + d.num_experts
    pid = torch.arange(grid, device=counts.device)
    expert = torch.searchsorted(block_end, pid, right=True)  # E for programs past the end
    e_safe = expert.clamp(max=d.num_experts - 1)
    first_block = block_end[e_safe] - blocks[e_safe]
    row = d.expert_offsets[e_safe] + (pid - first_block) * block_m
    out = (expert, row, grid)
    cache[block_m] = out
    return out


def inverse_permutation(d: Dispatch) -> torch.Tensor:
    """[M] int64: sorted row of each slot t * k + j (rows >= expert_offsets[E] are dropped)."""
    cache = d.cache
    if "inv" not in cache:
        inv = torch.empty_like(d.sorted_pair_idx)
        inv[d.sorted_pair_idx] = torch.arange(d.num_pairs, device=inv.device)
        cache["inv"] = inv
    return cache["inv"]
