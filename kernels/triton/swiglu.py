"""SwiGLU between the two grouped linears: h [M, 2F] (gate; up) -> a [M, F], and back."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import common
from kernels.triton.common import cast_out


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
    s = tl.sigmoid(g)
    dg = da * u * s * (1.0 + g * (1.0 - s))
    du = da * g * s
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
