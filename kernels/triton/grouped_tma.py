"""The grouped GEMMs with their tiles brought by TMA: Hopper's tensor-memory accelerator
copies each tile to shared memory on its own, so no thread spends registers or issue slots on
addresses, and the wgmma reads the tiles where they land. The same results as grouped_mm's
cp.async kernels; further candidates the Triton backend times per shape
(kernels/triton/pick.py, "tma") on sm_90 and newer, for 16-bit floats.

scatter2scatter: weights through a 3-D descriptor over [E, N, K] (or, for the transposed
view that the input gradient uses, over the [E, K, N] tensor underneath), so a tile never
reaches into the next expert: rows past N and columns past K arrive as zeros. Grouped input
rows through a 2-D descriptor over [M, K]; a block's rows past its expert's end belong to the
next expert and are computed but never stored. Rows in token or slot order are gathered by
pointer.

group_weight_grad: on expert-ordered rows (the backend gathers others first), an expert's
whole blocks of rows come by TMA, its partial last block by masked pointer loads, so no row
of another expert, or a dropped one, enters its sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.dispatch import Dispatch
from kernels.triton import common, grouped_mm
from kernels.triton.common import autotuning, cast_out, interpreting, row_index, swizzle
from kernels.triton.grouped_mm import pick_block_m
from kernels.triton.schedule import block_schedule


def _aligned(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """TMA's rule for a global tensor: its address and the strides of dims 16-byte aligned."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(t.stride(i) * size % 16 == 0 for i in dims)


def _weight_view(w: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """w [E, N, K] -> (the tensor a descriptor covers, True if it is w itself ([E, N, K], K
    contiguous) or False if it is w.transpose(1, 2) ([E, K, N], N contiguous)); None if
    neither has a contiguous last dimension and aligned strides."""
    if w.stride(2) == 1 and _aligned(w, (0, 1)):
        return w, True
    wt = w.transpose(1, 2)
    if wt.stride(2) == 1 and _aligned(wt, (0, 1)):
        return wt, False
    return None


def _tma_operands(x: torch.Tensor, other: torch.Tensor) -> bool:
    """16-bit floats, both of one dtype, on a GPU with TMA (sm_90+), or anywhere under the
    interpreter (tests)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or other.dtype != x.dtype:
        return False
    return interpreting() or (x.device.type == "cuda"
                              and torch.cuda.get_device_capability(x.device)[0] >= 9)


def supports(x: torch.Tensor, w: torch.Tensor, x_grouped: bool) -> bool:
    """scatter2scatter takes these operands: _tma_operands, TMA-aligned weights (and grouped
    input rows)."""
    if not _tma_operands(x, w):
        return False
    if x.stride(1) != 1 or (x_grouped and not _aligned(x, (0,))):
        return False
    return _weight_view(w) is not None


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: each descriptor's box is the config's tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if nargs["x_desc"] is not None:
        nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [1, bn, bk] if nargs["W_NK"] else [1, bk, bn]


def _configs():
    def config(bn, bk, warps, stages):
        return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                             num_stages=stages, pre_hook=_set_block_shapes)

    if interpreting():
        return [config(32, 32, 4, 1)]
    # three configs: each is compiled on first use of a shape, beside grouped_mm's three
    configs = [config(128, 64, 8, 4), config(256, 64, 8, 3), config(64, 64, 4, 4)]
    return configs if autotuning() else configs[-1:]


def _fitting(configs, named_args, **kwargs):
    """A SwiGLU end (GLU) keeps two [BLOCK_M, BLOCK_N] float32 tiles in registers (gate and
    up, or da beside h's): 256 columns would spill (bench/kernels_offline.py)."""
    if not kwargs.get("GLU"):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] <= 128] or configs


@triton.autotune(do_bench=common.bench, configs=_configs(),
                 key=["N", "K", "BLOCK_M", "X_GROUPED", "Y_GROUPED", "W_NK", "GLU"],
                 prune_configs_by={"early_config_prune": _fitting}, reset_to_zero=["PART"])
# E and GRID_M take any value: specialising on them (divisible by 16 or not) would only
# recompile the kernel per expert count and per dispatch
@triton.jit(do_not_specialize=["E", "GRID_M"])
def _s2s_tma_kernel(
    X, x_desc, w_desc, Y, H, WTS, PART, pair_idx, block_expert, block_row, offsets,
    N, K, E, GRID_M, stride_xm, stride_ym, stride_yn, stride_hm, stride_part,
    FAN_OUT: tl.constexpr, X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr,
    W_NK: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """X_GROUPED: x_desc covers the grouped rows [M, K] (X unused); else X's rows are
    gathered through pair_idx by pointer. W_NK: w_desc covers [E, N, K], else [E, K, N].
    GLU: as grouped_mm._scatter2scatter_kernel's (1: w_desc covers 2N rows, gate then up;
    h to Y, a to H. 2: dh to Y from h in H. 3: as 2, the combine weights WTS applied and
    their gradient's partial sums to PART)."""
    pid_m, pid_n = swizzle(tl.program_id(0), GRID_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert + pid_m)
    if e < E:
        row0 = tl.load(block_row + pid_m)
        row_end = tl.load(offsets + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = rows < row_end
        n0 = pid_n * BLOCK_N
        ks = tl.arange(0, BLOCK_K)
        if not X_GROUPED:
            x_rows = row_index(pair_idx, rows, m_mask, False, FAN_OUT)
            x_ptrs = X + x_rows[:, None] * stride_xm + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N) if GLU == 1 else (1, 1), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if X_GROUPED:
                x = x_desc.load([row0.to(tl.int32), k0])
            else:
                x = tl.load(x_ptrs, mask=m_mask[:, None] & (ks < K - k0)[None, :], other=0.0)
                x_ptrs += BLOCK_K
            if W_NK:
                w = w_desc.load([e.to(tl.int32), n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                w = w_desc.load([e.to(tl.int32), k0, n0]).reshape(BLOCK_K, BLOCK_N)
            if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc)
            if GLU == 1:  # the up half: N further along the weight's output dimension
                if W_NK:
                    w = w_desc.load([e.to(tl.int32), N + n0, k0]).reshape(BLOCK_N, BLOCK_K).T
                else:
                    w = w_desc.load([e.to(tl.int32), k0, N + n0]).reshape(BLOCK_K, BLOCK_N)
                if UPCAST:
                    w = w.to(tl.float32)
                acc_up = tl.dot(x, w, acc_up)
        y_rows = row_index(pair_idx, rows, m_mask, Y_GROUPED, 1)
        cols = n0 + tl.arange(0, BLOCK_N)
        if GLU == 0:
            y_ptrs = Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
            tl.store(y_ptrs, cast_out(acc, Y.dtype.element_ty),
                     mask=m_mask[:, None] & (cols < N)[None, :])
        else:
            grouped_mm.glu_epilogue(acc, acc_up, Y, H, WTS, PART, pair_idx, y_rows, rows,
                                    m_mask, cols, N, stride_ym, stride_yn, stride_hm,
                                    stride_part, pid_n, GLU)


def scatter2scatter(x: torch.Tensor, w: torch.Tensor, d: Dispatch, x_grouped: bool,
                    y_grouped: bool, fan_out: int, glu: int = 0, h: torch.Tensor | None = None,
                    wts: torch.Tensor | None = None):
    """x [T or M, K], w [E, N, K] (K or N contiguous) -> y [M, N]; see kernels/reference.py.
    glu 1: w [E, 2F, K] -> (h [M, 2F], a [M, F]); glu 2: w [E, F, K], h [M, 2F] -> dh
    [M, 2F]; glu 3: as 2, with the combine weights wts [T, k] -> (dh, their gradient)
    (grouped_mm.scatter2scatter_swiglu, _bwd and _bwd_combined). The caller checks
    supports(x, w, x_grouped)."""
    view = _weight_view(w)
    if view is None:
        raise ValueError(f"TMA grouped GEMM: weights of strides {tuple(w.stride())} have no "
                         "contiguous, 16-byte aligned layout")
    wv, w_nk = view
    K = w.shape[2]
    N, y, h, part, (H, WTS, PART, stride_hm, stride_part) = grouped_mm.glu_buffers(
        x, d, w.shape[1], y_grouped, glu, h, wts)
    if d.num_pairs == 0:
        return grouped_mm.glu_outputs(y, h, part, glu, d)
    block_m = pick_block_m(d, x.element_size())
    block_expert, block_row, grid_m = block_schedule(d, block_m)
    # boxes are set per config by _set_block_shapes; these are placeholders
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 16]) if x_grouped else None
    w_desc = TensorDescriptor.from_tensor(wv, [1, 16, 16])

    def grid(meta):
        return (grid_m * triton.cdiv(N, meta["BLOCK_N"]),)

    _s2s_tma_kernel[grid](
        x, x_desc, w_desc, y, H, WTS, PART, d.sorted_pair_idx, block_expert, block_row,
        d.expert_offsets, N, K, d.num_experts, grid_m, x.stride(0), y.stride(0), y.stride(1),
        stride_hm, stride_part,
        FAN_OUT=fan_out, X_GROUPED=x_grouped, Y_GROUPED=y_grouped, W_NK=w_nk,
        UPCAST=interpreting(), GROUP_M=grouped_mm.GROUP, GLU=glu, BLOCK_M=block_m,
    )
    return grouped_mm.glu_outputs(y, h, part, glu, d)


def supports_wgrad(x: torch.Tensor, dy: torch.Tensor) -> bool:
    """group_weight_grad takes these expert-ordered rows: _tma_operands, contiguous and
    TMA-aligned."""
    return _tma_operands(x, dy) and all(t.stride(1) == 1 and _aligned(t, (0,)) for t in (x, dy))


def _set_wgrad_block_shapes(nargs: dict) -> None:
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["dy_desc"].block_shape = [bm, bn]


def _wgrad_configs():
    def config(bn, bk, bm, warps, stages):
        return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=warps,
                             num_stages=stages, pre_hook=_set_wgrad_block_shapes)

    if interpreting():
        return [config(32, 32, 16, 4, 1)]
    configs = [config(128, 128, 64, 8, 3), config(128, 256, 64, 8, 3),
               config(128, 64, 64, 4, 4)]
    return configs if autotuning() else configs[-1:]


@triton.autotune(do_bench=common.bench, configs=_wgrad_configs(), key=["N", "K"])
@triton.jit
def _wgrad_tma_kernel(
    X, x_desc, DY, dy_desc, DW, offsets,
    N, K, stride_xm, stride_dym, stride_we, stride_wn, stride_wk,
    UPCAST: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[e] tile [BLOCK_N, BLOCK_K] = sum over expert e's rows of dy^T x, both grouped
    ([M, K] and [M, N]): the expert's whole blocks of rows by TMA, software-pipelined; its
    partial last block by loads masked at the expert's end (the rows after it are another
    expert's, or dropped ones that may hold anything)."""
    e = tl.program_id(1)  # expert-major launch order: resident programs share e's rows
    pid_n, pid_k = swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    start = tl.load(offsets + e).to(tl.int32)  # TMA coordinates are 32-bit
    end = tl.load(offsets + e + 1).to(tl.int32)
    n0, k0 = pid_n * BLOCK_N, pid_k * BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    full_end = start + (end - start) // BLOCK_M * BLOCK_M
    for m0 in range(start, full_end, BLOCK_M):
        dy = dy_desc.load([m0, n0])
        x = x_desc.load([m0, k0])
        if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(dy.T, x, acc)
    cols_n = n0 + tl.arange(0, BLOCK_N)
    cols_k = k0 + tl.arange(0, BLOCK_K)
    if full_end < end:
        rows = full_end + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = (rows < end)[:, None]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols_n[None, :],
                     mask=m_ok & (cols_n < N)[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + cols_k[None, :],
                    mask=m_ok & (cols_k < K)[None, :], other=0.0)
        if UPCAST:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(dy.T, x, acc)
    dw_ptrs = (DW + e.to(tl.int64) * stride_we + cols_n[:, None] * stride_wn
               + cols_k[None, :] * stride_wk)
    tl.store(dw_ptrs, cast_out(acc, DW.dtype.element_ty),
             mask=(cols_n < N)[:, None] & (cols_k < K)[None, :])


def group_weight_grad(x: torch.Tensor, dy: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Expert-ordered rows x [M, K], dy [M, N] -> dw [E, N, K] (zeros for experts without
    rows); see kernels/reference.py (grouped_mm.group_weight_grad gathers rows in token or
    slot order first). The caller checks supports_wgrad."""
    N, K, E = dy.shape[1], x.shape[1], d.num_experts
    if d.num_pairs == 0:
        return torch.zeros(E, N, K, dtype=x.dtype, device=x.device)
    dw = common.empty(E, N, K, dtype=x.dtype, device=x.device)
    # boxes are set per config by _set_wgrad_block_shapes; these are placeholders
    x_desc = TensorDescriptor.from_tensor(x, [16, 16])
    dy_desc = TensorDescriptor.from_tensor(dy, [16, 16])

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), E)

    _wgrad_tma_kernel[grid](
        x, x_desc, dy, dy_desc, dw, d.expert_offsets,
        N, K, x.stride(0), dy.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        UPCAST=interpreting(), GROUP_N=grouped_mm.GROUP,
    )
    return dw
