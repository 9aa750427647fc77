"""SwiGLU between the two grouped linears: h [M, 2F] (gate; up) -> a [M, F], and back; and
back with the weighted combine's (swiglu_bwd_combined)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import Dispatch
from kernels.triton import common
from kernels.triton.common import cast_out, swiglu_grads


@triton.jit
def _swiglu_fwd_kernel(H, A, ROWS, F, stride_h, stride_a, BLOCK: tl.constexpr,
                       HAS_ROWS: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:  # rows past the kept ones (dropped pairs): nothing to read or write
        if m >= tl.load(ROWS):
            return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(H + m * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(H + m * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(A + m * stride_a + cols, cast_out(a, A.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(H, DA, DH, ROWS, F, stride_h, stride_da, stride_dh, BLOCK: tl.constexpr,
                       HAS_ROWS: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        if m >= tl.load(ROWS):
            return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(H + m * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(H + m * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(DA + m * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
    dg, du = swiglu_grads(da, g, u, tl.sigmoid(g))
    tl.store(DH + m * stride_dh + cols, cast_out(dg, DH.dtype.element_ty), mask=mask)
    tl.store(DH + m * stride_dh + F + cols, cast_out(du, DH.dtype.element_ty), mask=mask)


def _block(f: int) -> int:
    return min(1024, triton.next_power_of_2(max(f, 16)))


def swiglu_fwd(h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """h [M, 2F] -> a [M, F] = silu(gate) * up. rows: a [1] int64 device tensor n; only the
    first n rows are computed (the rest are dropped pairs: left unwritten), read on the
    device, so the host never waits for it."""
    M, F = h.shape[0], h.shape[1] // 2
    a = common.empty(M, F, dtype=h.dtype, device=h.device)
    if M:
        _swiglu_fwd_kernel[(M, triton.cdiv(F, _block(F)))](
            h, a, h if rows is None else rows, F, h.stride(0), a.stride(0), BLOCK=_block(F),
            HAS_ROWS=rows is not None)
    return a


def swiglu_bwd(h: torch.Tensor, da: torch.Tensor, rows: torch.Tensor | None = None
               ) -> torch.Tensor:
    """h [M, 2F], da [M, F] -> dh [M, 2F] (rows: as swiglu_fwd's)."""
    M, F = h.shape[0], h.shape[1] // 2
    dh = common.empty(*h.shape, dtype=h.dtype, device=h.device)
    if M:
        _swiglu_bwd_kernel[(M, triton.cdiv(F, _block(F)))](
            h, da, dh, h if rows is None else rows, F, h.stride(0), da.stride(0), dh.stride(0),
            BLOCK=_block(F), HAS_ROWS=rows is not None)
    return dh


@triton.jit
def _swiglu_bwd_combined_kernel(H, DAU, DH, WTS, PAIR, EXPERT, PART, E, F, stride_h, stride_dau,
                                stride_dh, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    part = PART + m * tl.num_programs(1) + nb
    if tl.load(EXPERT + m) >= E:  # a dropped pair: no weight gradient, its dh row unread
        tl.store(part, 0.0)
        return
    cols = nb * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(H + m * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(H + m * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
    dau = tl.load(DAU + m * stride_dau + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    a = cast_out(g * s * u, H.dtype.element_ty).to(tl.float32)  # as the forward stored it
    tl.store(part, tl.sum(dau * a, axis=0))
    wt = tl.load(WTS + tl.load(PAIR + m)).to(tl.float32)
    dg, du = swiglu_grads(cast_out(dau * wt, H.dtype.element_ty).to(tl.float32), g, u, s)
    tl.store(DH + m * stride_dh + cols, cast_out(dg, DH.dtype.element_ty), mask=mask)
    tl.store(DH + m * stride_dh + F + cols, cast_out(du, DH.dtype.element_ty), mask=mask)


def swiglu_bwd_combined(da_u: torch.Tensor, h: torch.Tensor, weights: torch.Tensor,
                        d: Dispatch) -> tuple[torch.Tensor, torch.Tensor]:
    """da_u [M, F] grouped (dout @ the down projection, before the combine weight), h
    [M, 2F], weights [T, k] -> (dh [M, 2F], dweights [T, k] float32), as
    kernels.reference.swiglu_bwd_combined, in one pass over the rows: after a GEMM that has
    no epilogue (cuBLAS per expert, torch's grouped matmul). Dropped pairs (sorted last) get
    a zero weight gradient and their dh rows are left unwritten."""
    M, F = h.shape[0], h.shape[1] // 2
    dh = common.empty(*h.shape, dtype=h.dtype, device=h.device)
    n_blocks = triton.cdiv(F, _block(F))
    part = torch.empty(M, n_blocks, dtype=torch.float32, device=h.device)
    if M:
        _swiglu_bwd_combined_kernel[(M, n_blocks)](
            h, da_u, dh, weights.reshape(-1), d.sorted_pair_idx, d.sorted_expert_idx, part,
            d.num_experts, F, h.stride(0), da_u.stride(0), dh.stride(0), BLOCK=_block(F))
    dwts = torch.zeros(d.num_pairs, dtype=torch.float32, device=h.device).index_copy_(
        0, d.sorted_pair_idx, part.sum(1))
    return dh, dwts.view(d.num_tokens, d.top_k)
