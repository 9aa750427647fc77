"""The grouped GEMMs on PyTorch's grouped matmul (`torch._grouped_mm`: CUTLASS on Hopper) over
gathered rows: a second implementation of scatter2scatter and group_weight_grad that the Triton
backend times against its own kernels and uses where it is faster (coarse experts with
thousands of rows each, where a vendor GEMM beats a gathering Triton one).

Same index conventions and results as kernels/reference.py; rows of dropped pairs are zero.
"""

from __future__ import annotations

import torch

from kernels.dispatch import Dispatch
from kernels.reference import sorted_rows


def supports(x: torch.Tensor, n: int, k: int) -> bool:
    """torch._grouped_mm is there and takes these sizes: 16-byte aligned rows of bf16 / fp16
    on CUDA (any float on the CPU, where it is a reference loop)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and x.dtype not in (torch.bfloat16, torch.float16):
        return False
    align = 16 // x.element_size()
    return n % align == 0 and k % align == 0


def _offsets(d: Dispatch) -> torch.Tensor:
    """[E] int32 end row of each expert (the kept rows; dropped rows come after)."""
    cache = d.cache
    if "offs32" not in cache:
        cache["offs32"] = d.expert_offsets[1:].to(torch.int32)
    return cache["offs32"]


def scatter2scatter(x, w, d: Dispatch, x_grouped: bool, y_grouped: bool, fan_out: int):
    """x [T or M, K], w [E, N, K] -> y [M, N] (see kernels/reference.py)."""
    M, N = d.num_pairs, w.shape[1]
    if M == 0:
        return torch.zeros(0, N, dtype=x.dtype, device=x.device)
    xs = sorted_rows(x, d, x_grouped, fan_out, M).contiguous()
    ys = torch._grouped_mm(xs, w.transpose(1, 2), offs=_offsets(d))
    if d.may_drop:  # dropped rows (expert E, past the kept ones) are not computed
        ys.masked_fill_((d.sorted_expert_idx == d.num_experts)[:, None], 0)
    if y_grouped:
        return ys
    y = torch.empty_like(ys)
    y[d.sorted_pair_idx] = ys
    return y


def group_weight_grad(x, dy, d: Dispatch, x_grouped: bool, x_fan_out: int, dy_grouped: bool):
    """x rows [., K], dy rows [., N] -> dw [E, N, K] (zeros for experts without rows)."""
    E, N, K = d.num_experts, dy.shape[1], x.shape[1]
    if d.num_pairs == 0:
        return torch.zeros(E, N, K, dtype=x.dtype, device=x.device)
    xs = sorted_rows(x, d, x_grouped, x_fan_out, d.num_pairs).contiguous()
    dys = sorted_rows(dy, d, dy_grouped, 1, d.num_pairs).contiguous()
    return torch._grouped_mm(dys.t(), xs, offs=_offsets(d))
