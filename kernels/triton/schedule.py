"""Block schedule: which expert and which first row each BLOCK_M-row program handles.

Computed on the device from the dispatch offsets, in one kernel (no host sync); the grid is
sized by the upper bound cdiv(M, BLOCK_M) + E, and programs past the real block count see
expert E and exit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import Dispatch


@triton.jit
def _schedule_kernel(OFFSETS, BLOCK_EXPERT, BLOCK_ROW, E, GRID, BLOCK_M: tl.constexpr,
                     E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Entries pid of the schedule: expert e takes ceil(rows_e / BLOCK_M) blocks, in expert
    order; pid's expert is the number of experts whose blocks end at or before it (E past
    the last block), its first row its expert's first plus BLOCK_M per earlier block."""
    ex = tl.arange(0, E_PAD)
    valid = ex < E
    start = tl.load(OFFSETS + ex, mask=valid, other=0).to(tl.int32)  # rows < 2^31
    end = tl.load(OFFSETS + ex + 1, mask=valid, other=0).to(tl.int32)
    blocks = (end - start + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    first = block_end - blocks
    pid = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    done = (block_end[None, :] <= pid[:, None]) & valid[None, :]
    e = tl.sum(done.to(tl.int32), 1)
    own = ex[None, :] == e[:, None]  # its expert's column (none for pids past the end)
    row = tl.sum(tl.where(own, start[None, :] + (pid[:, None] - first[None, :]) * BLOCK_M, 0), 1)
    ok = pid < GRID
    tl.store(BLOCK_EXPERT + pid, e.to(tl.int64), mask=ok)
    tl.store(BLOCK_ROW + pid, row.to(tl.int64), mask=ok)


def block_schedule(d: Dispatch, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dispatch -> (block_expert [G] int64, block_row [G] int64, G) for BLOCK_M-row programs."""
    cache = d.cache
    if block_m in cache:
        return cache[block_m]
    E = d.num_experts
    grid = (d.num_pairs + block_m - 1) // block_m + E
    dev = d.expert_offsets.device
    expert = torch.empty(grid, dtype=torch.int64, device=dev)
    row = torch.empty(grid, dtype=torch.int64, device=dev)
    e_pad = max(2, triton.next_power_of_2(E))
    chunk = max(16, 4096 // e_pad)  # entries a program writes: [chunk, e_pad] temporaries
    _schedule_kernel[(triton.cdiv(grid, chunk),)](
        d.expert_offsets, expert, row, E, grid, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk)
    out = (expert, row, grid)
    cache[block_m] = out
    return out


def inverse_permutation(d: Dispatch) -> torch.Tensor:
    """[M] int64: sorted row of each slot t * k + j (rows >= expert_offsets[E] are dropped);
    the sort's own when it wrote them."""
    if d.slot_rows is not None:
        return d.slot_rows
    cache = d.cache
    if "inv" not in cache:
        inv = torch.empty_like(d.sorted_pair_idx)
        inv[d.sorted_pair_idx] = torch.arange(d.num_pairs, device=inv.device)
        cache["inv"] = inv
    return cache["inv"]
