"""Weighted combine of expert outputs back to token order, and its backward (no atomics)."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.dispatch import Dispatch
from kernels.triton import common
from kernels.triton.common import cast_out
from kernels.triton.schedule import inverse_permutation


@triton.jit
def _combine_kernel(
    Y, WTS, OUT, inv, n_kept_ptr, N, stride_ym, stride_om,
    TOP_K: tl.constexpr, Y_GROUPED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    n_kept = tl.load(n_kept_ptr)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        p = t * TOP_K + j
        row = tl.load(inv + p)
        keep = row < n_kept
        w = tl.load(WTS + p).to(tl.float32)
        if Y_GROUPED:
            y_row = row
        else:
            y_row = p
        y_mask = cols < tl.where(keep, N, 0)  # dropped pairs: read nothing
        y = tl.load(Y + y_row * stride_ym + cols, mask=y_mask, other=0.0)
        acc += tl.where(keep, w, 0.0) * y.to(tl.float32)
    tl.store(OUT + t * stride_om + cols, cast_out(acc, OUT.dtype.element_ty), mask=n_mask)


@triton.jit
def _combine_bwd_kernel(
    DOUT, Y, WTS, DY, DWTS, inv, n_kept_ptr, N, stride_dom, stride_ym, stride_dym,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, Y_GROUPED: tl.constexpr, HAS_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A token's rows of dy = weight * dout, and (HAS_Y) its weights' gradient dout . y."""
    t = tl.program_id(0).to(tl.int64)
    n_kept = tl.load(n_kept_ptr)
    slots = tl.arange(0, K_PAD)
    dots = tl.zeros((K_PAD,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        n_mask = cols < N
        dout = tl.load(DOUT + t * stride_dom + cols, mask=n_mask, other=0.0).to(tl.float32)
        for j in tl.static_range(TOP_K):
            p = t * TOP_K + j
            row = tl.load(inv + p)
            keep = row < n_kept
            w = tl.load(WTS + p).to(tl.float32)
            y_mask = cols < tl.where(keep, N, 0)
            if Y_GROUPED:
                y_row = row
                tl.store(DY + y_row * stride_dym + cols, cast_out(w * dout, DY.dtype.element_ty),
                         mask=y_mask)
            else:
                y_row = p
                tl.store(DY + y_row * stride_dym + cols,
                         cast_out(tl.where(keep, w * dout, 0.0), DY.dtype.element_ty), mask=n_mask)
            if HAS_Y:
                y = tl.load(Y + y_row * stride_ym + cols, mask=y_mask, other=0.0)
                part = tl.sum(dout * y.to(tl.float32), axis=0)
                dots += tl.where(slots == j, part, 0.0)
    if HAS_Y:
        tl.store(DWTS + t * TOP_K + slots, cast_out(dots, DWTS.dtype.element_ty),
                 mask=slots < TOP_K)


def _block_n(n: int) -> int:
    return min(1024, triton.next_power_of_2(max(n, 16)))


def weighted_combine(y, weights, d: Dispatch, y_grouped: bool):
    """y [M, N], weights [T, k] -> out [T, N]."""
    T, N = d.num_tokens, y.shape[1]
    out = common.empty(T, N, dtype=y.dtype, device=y.device)
    if T == 0:
        return out
    bn = _block_n(N)
    _combine_kernel[(T, triton.cdiv(N, bn))](
        y, weights.contiguous(), out, inverse_permutation(d), d.expert_offsets[-1:], N,
        y.stride(0), out.stride(0), TOP_K=d.top_k, Y_GROUPED=y_grouped, BLOCK_N=bn,
    )
    return out


def weighted_combine_backward(dout, y, weights, d: Dispatch, y_grouped: bool):
    """dout [T, N] -> (dy [M, N] in y's order, dweights [T, k])."""
    return _backward(dout, y, weights, d, y_grouped)


def combine_grad_rows(dout, weights, d: Dispatch):
    """dout [T, N] -> dy [M, N] grouped: weight * dout in each kept row (rows past the kept
    ones unwritten); the backward of a combine whose weights' gradient comes from elsewhere
    (grouped_mm.scatter2scatter_swiglu_bwd_combined), so that y is neither kept nor read."""
    return _backward(dout, None, weights, d, True)[0]


def _backward(dout, y, weights, d: Dispatch, y_grouped: bool):
    """-> (dy [M, N], dweights [T, k], or None when y is None: the kernel reads no y)."""
    T, N, like = d.num_tokens, dout.shape[1], dout if y is None else y
    dy = common.empty(d.num_pairs, N, dtype=like.dtype, device=like.device)
    dw = None if y is None else common.empty(T, d.top_k, dtype=weights.dtype,
                                             device=weights.device)
    if T == 0:
        return dy, dw
    _combine_bwd_kernel[(T,)](
        dout, like, weights.contiguous(), dy, dy if dw is None else dw, inverse_permutation(d),
        d.expert_offsets[-1:], N, dout.stride(0), like.stride(0), dy.stride(0),
        TOP_K=d.top_k, K_PAD=max(2, triton.next_power_of_2(d.top_k)), Y_GROUPED=y_grouped,
        HAS_Y=y is not None, BLOCK_N=_block_n(N),
    )
    return dy, dw
