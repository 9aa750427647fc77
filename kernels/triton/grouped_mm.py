"""Grouped GEMM kernels over expert-sorted rows (ScatterMoE-style scatter2scatter).

Inputs are read straight through the sort order (no gathered copy, no capacity padding);
outputs are written expert-grouped or back in slot order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference, torch_grouped
from kernels.dispatch import Dispatch
from kernels.quant import FP8_FORMATS, QuantWeight
from kernels.triton import common, pick
from kernels.triton.common import (
    autotuning,
    cast_out,
    dot_precision,
    interpreting,
    row_index,
    swiglu_grads,
    swizzle,
)
from kernels.triton.schedule import block_schedule
from kernels.triton.swiglu import swiglu_bwd, swiglu_bwd_combined, swiglu_fwd


def _s2s_configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (128, 64, 8, 4), (256, 64, 8, 3), (64, 64, 4, 4), (64, 64, 8, 4),
        ]
    ]
    # untuned (tests): the tile every input dtype builds without spilling (in 8 warps for a
    # float32 SwiGLU end; _s2s_fitting leaves one of the two)
    return configs if autotuning() else configs[2:]


def _s2s_fitting(configs, named_args, **kwargs):
    """The configs whose tiles fit the registers (bench/kernels_offline.py, sm_90): 4-byte
    inputs (float32 dots, no tensor cores: operands and accumulator in registers) take the
    64-column tile (128 columns spilled, 13 KiB a thread at 256 and 128 rows), in 8 warps
    with a SwiGLU end (GLU; 4 spilled at GLU 3), MXFP4 weights at most 128 columns (256
    spilled 272 bytes with Triton 3.6); 16-bit ones the tensor-core tiles in the warps they
    were tuned with."""
    glu = kwargs.get("GLU", 0)
    if named_args["X"].element_size() >= 4:
        warps = 8 if glu else 4
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 64 and c.num_warps == warps] \
            or configs
    widest = 128 if kwargs.get("FP4") or glu else 256  # GLU: two [BLOCK_M, BLOCK_N] tiles
    return [c for c in configs if c.kwargs["BLOCK_N"] <= widest
            and (c.kwargs["BLOCK_N"], c.num_warps) != (64, 8)] or configs


@triton.jit
def _fp8_value(byte, FP8: tl.constexpr):
    """uint8 codes (as int32) -> their float32 values. FP8 1: E4M3 (fn: bias 7, 3 mantissa
    bits, subnormals m 2^-9), 2: E5M2 (bias 15, 2 mantissa bits, subnormals m 2^-16). Built
    from the bits, so any GPU (and the interpreter) decodes it. NaN and infinity codes,
    which no weight holds, are not singled out."""
    sign = (byte & 0x80) != 0
    if FP8 == 1:
        ex, m = (byte >> 3) & 0xF, byte & 7
        normal = ((ex + 120) << 23) | (m << 20)  # float32 exponent field: ex - 7 + 127
        sub = m.to(tl.float32) * 0.001953125  # 2^-9
    else:
        ex, m = (byte >> 2) & 0x1F, byte & 3
        normal = ((ex + 112) << 23) | (m << 21)  # ex - 15 + 127
        sub = m.to(tl.float32) * 0.0000152587890625  # 2^-16
    mag = tl.where(ex == 0, sub, normal.to(tl.float32, bitcast=True))
    return tl.where(sign, -mag, mag)


@triton.jit
def _load_quant_tile(W, S, e, k0, ks, cols, k_left, n_ok, stride_we, stride_wn, stride_wk,
                     stride_se, stride_sn, stride_sg, BITS: tl.constexpr, QGROUP: tl.constexpr,
                     FP4: tl.constexpr, FP8: tl.constexpr, QROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of expert e's weight at columns k0 + ks (k_left of them
    left before K), rows cols, dequantized to dtype: int8 values, FP8 codes (FP8 1: E4M3,
    2: E5M2, as uint8), or 4-bit ones two to a byte (even column low), offset by 8 or (FP4)
    E2M1 codes; times the scale of their QGROUP-column group in their QROWS-row block (FP4:
    a uint8 E8M0 exponent)."""
    kk = k0 + ks
    mask = (ks < k_left)[:, None] & n_ok[None, :]
    base = W + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    if FP8 != 0:
        byte = tl.load(base + kk[:, None] * stride_wk, mask=mask, other=0).to(tl.int32)
        q = _fp8_value(byte, FP8)
    elif BITS == 8:
        q = tl.load(base + kk[:, None] * stride_wk, mask=mask, other=0).to(tl.float32)
    else:  # each byte once: the even columns' nibbles (low) joined to the odd ones' (high)
        pair = tl.arange(0, BLOCK_K // 2)
        byte = tl.load(base + (k0 // 2 + pair)[:, None] * stride_wk,
                       mask=(2 * pair < k_left)[:, None] & n_ok[None, :], other=0).to(tl.int32)
        nib = tl.reshape(tl.permute(tl.join(byte & 0xF, byte >> 4), (0, 2, 1)),
                         (BLOCK_K, byte.shape[1]))
        if FP4:  # E2M1 as float32 bits: 0.5 m when the exponent is 0, else (1 + 0.5 m)
            # 2^(exp - 1), i.e. exponent field exp + 126 and the mantissa's top bit m
            ex, m = (nib >> 1) & 3, nib & 1
            bits = tl.where(ex == 0, m * (126 << 23), ((ex + 126) << 23) | (m << 22))
            q = (bits | ((nib & 8) << 28)).to(tl.float32, bitcast=True)
        else:
            q = nib.to(tl.float32) - 8.0
    s_base = S + e.to(tl.int64) * stride_se + (cols // QROWS) * stride_sn
    if QGROUP % BLOCK_K == 0:  # the tile lies in one group: one scale per row of w
        scale = tl.load(s_base + (k0 // QGROUP) * stride_sg, mask=n_ok, other=0)[None, :]
    else:
        scale = tl.load(s_base[None, :] + (kk // QGROUP)[:, None] * stride_sg, mask=mask,
                        other=0)
    if FP4:  # E8M0 scales: the biased exponent is a float32's exponent field, 2^(s - 127)
        scale = (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return cast_out(q * scale, dtype)


@triton.jit
def glu_epilogue(acc, acc_up, Y, H, WTS, PART, pair_idx, y_rows, rows, m_mask, cols, N,
                 stride_ym, stride_yn, stride_hm, stride_part, pid_n, GLU: tl.constexpr):
    """The SwiGLU ends of the grouped GEMMs, on an output tile [BLOCK_M, BLOCK_N] of columns
    cols (< N = F), rows y_rows of Y and rows (sorted, grouped; m_mask: kept) of H. GLU 1
    (forward): acc and acc_up are the gate and up tiles of h: Y [M, 2F] gets h, H [M, F]
    gets a = silu(gate) * up. GLU 2 (backward): acc is the tile of da; H [M, 2F] holds h: Y
    [M, 2F] gets dh. GLU 3: acc is the tile of da before the combine weight (the GEMM read
    the output's gradient in token order): PART[pid_n, pair] gets this tile's share of the
    weight's gradient, sum over its columns of da * a (a recomputed from h), and da is acc
    times the pair's weight (WTS [T * k] by pair) before SwiGLU's backward. The GEMM's
    results are rounded to Y's dtype first, as the separate kernels would read them."""
    dtype = Y.dtype.element_ty
    mask = m_mask[:, None] & (cols < N)[None, :]
    y_ptrs = Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :]
    if GLU == 1:
        g = cast_out(acc, dtype)
        u = cast_out(acc_up, dtype)
        tl.store(y_ptrs, g, mask=mask)
        tl.store(y_ptrs + N * stride_yn, u, mask=mask)
        g, u = g.to(tl.float32), u.to(tl.float32)
        tl.store(h_ptrs, cast_out(g * tl.sigmoid(g) * u, dtype), mask=mask)
    else:
        g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        if GLU == 3:
            pairs = tl.load(pair_idx + rows, mask=m_mask, other=0)
            a = cast_out(g * s * u, dtype).to(tl.float32)  # as the forward stored it
            tl.store(PART + pid_n * stride_part + pairs, tl.sum(acc * a, axis=1), mask=m_mask)
            acc = acc * tl.load(WTS + pairs, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        dg, du = swiglu_grads(cast_out(acc, dtype).to(tl.float32), g, u, s)
        tl.store(y_ptrs, cast_out(dg, dtype), mask=mask)
        tl.store(y_ptrs + N * stride_yn, cast_out(du, dtype), mask=mask)


@triton.autotune(do_bench=common.bench, configs=_s2s_configs(),
                 key=["N", "K", "BLOCK_M", "X_GROUPED", "Y_GROUPED", "BITS", "FP4", "FP8",
                      "GLU"], reset_to_zero=["PART"],
                 prune_configs_by={"early_config_prune": _s2s_fitting})
# E and GRID_M take any value: specialising on them (divisible by 16 or not) would only
# recompile the kernel per expert count and per dispatch
@triton.jit(do_not_specialize=["E", "GRID_M"])
def _scatter2scatter_kernel(
    X, W, S, Y, H, WTS, PART, pair_idx, block_expert, block_row, offsets,
    N, K, E, GRID_M,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg,
    stride_ym, stride_yn, stride_hm, stride_part,
    FAN_OUT: tl.constexpr, X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
    BITS: tl.constexpr, QGROUP: tl.constexpr, FP4: tl.constexpr, FP8: tl.constexpr,
    QROWS: tl.constexpr, GLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BITS 0: W holds the weights (any float dtype); 8 or 4: W holds the packed integers or
    FP8 codes and S their float32 scales (see kernels/quant.py), dequantized here, tile by
    tile. GLU 0: Y [M, N] = the GEMM; 1: W holds [E, 2N, K] (gate; up) and the GEMM's two
    halves go through glu_epilogue (h to Y, a to H); 2: the GEMM is da [M, N], and dh goes
    to Y from h in H; 3: as 2, with the combine weights applied here and their gradient's
    partial sums to PART (glu_epilogue). H, WTS and PART are unused where GLU does not name
    them."""
    pid_m, pid_n = swizzle(tl.program_id(0), GRID_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert + pid_m)
    if e < E:
        row0 = tl.load(block_row + pid_m)
        row_end = tl.load(offsets + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = rows < row_end
        x_rows = row_index(pair_idx, rows, m_mask, X_GROUPED, FAN_OUT)
        y_rows = row_index(pair_idx, rows, m_mask, Y_GROUPED, 1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols < N
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = X + x_rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = (W + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk
                  + cols[None, :] * stride_wn)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N) if GLU == 1 else (1, 1), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = ks < K - k0
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if BITS == 0:
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            else:
                w = _load_quant_tile(W, S, e, k0, ks, cols, K - k0, n_mask,
                                     stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                                     stride_sg, BITS, QGROUP, FP4, FP8, QROWS, BLOCK_K,
                                     X.dtype.element_ty)
            if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if GLU == 1:  # the up half: rows N.. of the same expert's weight
                w = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :],
                            other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                acc_up = tl.dot(x, w, acc_up, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if GLU == 0:
            y_ptrs = Y + y_rows[:, None] * stride_ym + cols[None, :] * stride_yn
            tl.store(y_ptrs, cast_out(acc, Y.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])
        else:
            glu_epilogue(acc, acc_up, Y, H, WTS, PART, pair_idx, y_rows, rows, m_mask, cols, N,
                         stride_ym, stride_yn, stride_hm, stride_part, pid_n, GLU)


# Tile rows walked together by the grouped launch order (see common.swizzle); 1 = row-major order.
GROUP = 8


def pick_block_m(d: Dispatch, elem_bytes: int = 2) -> int:
    """Rows per program: smaller blocks when experts get few rows (fine-grained MoE) or the
    inputs take 4 bytes (float32 dots keep their operands in registers: 128 rows spill)."""
    if interpreting():
        return 16
    avg = d.num_pairs / max(d.num_experts, 1)
    return 64 if avg < 256 or elem_bytes >= 4 else 128


def _fastest(op: str, x: torch.Tensor, d: Dispatch, n: int, k: int, flags: tuple,
             ours, theirs, loop, tma=None) -> torch.Tensor:
    """ours() (our kernel), tma() (ours with TMA tiles, kernels/triton/grouped_tma.py, where
    given), theirs() (PyTorch's grouped matmul, where it takes these sizes) or loop() (one
    cuBLAS GEMM per expert over gathered rows, the reference path: coarse experts with
    thousands of rows each), whichever times fastest for this shape key
    (kernels/triton/pick.py): sizes, dtype, rows per expert (power of 2), flags."""
    candidates = {"triton": ours}
    if tma is not None:
        candidates["tma"] = tma
    if torch_grouped.supports(x, n, k):
        candidates["torch"] = theirs
    candidates["loop"] = loop
    rows = triton.next_power_of_2(max(1, d.num_pairs // max(d.num_experts, 1)))
    key = (op, n, k, d.num_experts, rows, x.dtype, x.device.type, d.may_drop, *flags)
    return pick.run(key, candidates, x.device)


def scatter2scatter(x, w, d: Dispatch, x_grouped: bool, y_grouped: bool, fan_out: int):
    """x [T or M, K], w [E, N, K] (any strides) -> y [M, N]; see kernels/reference.py.
    Our kernel (cp.async or TMA tiles), or PyTorch's grouped matmul or a GEMM per expert where
    one times faster."""
    from kernels.triton import grouped_tma

    tma = None
    if grouped_tma.supports(x, w, x_grouped):
        def tma():
            return grouped_tma.scatter2scatter(x, w, d, x_grouped, y_grouped, fan_out)
    return _fastest(
        "s2s", x, d, w.shape[1], w.shape[2], (x_grouped, y_grouped),
        lambda: _launch(x, w, None, d, x_grouped, y_grouped, fan_out),
        lambda: torch_grouped.scatter2scatter(x, w, d, x_grouped, y_grouped, fan_out),
        lambda: reference.scatter2scatter(x, w, d, x_grouped, y_grouped, fan_out), tma)


def scatter2scatter_swiglu(x, w, d: Dispatch, x_grouped: bool, fan_out: int,
                           rows: torch.Tensor | None = None):
    """x [T or M, K], w [E, 2F, K] (gate; up) -> (h [M, 2F], a [M, F] = silu(gate) * up),
    both grouped: the SwiGLU in the GEMM's epilogue (our kernels, cp.async or TMA tiles), or
    PyTorch's grouped matmul or a GEMM per expert followed by the SwiGLU kernel, whichever
    times fastest. rows: as swiglu_fwd's (the kernels skip dropped rows anyway)."""
    from kernels.triton import grouped_tma

    def then_swiglu(gemm):
        def run():
            h = gemm(x, w, d, x_grouped, True, fan_out)
            return h, swiglu_fwd(h, rows)
        return run

    tma = None
    if grouped_tma.supports(x, w, x_grouped):
        def tma():
            return grouped_tma.scatter2scatter(x, w, d, x_grouped, True, fan_out, glu=1)
    return _fastest(
        "s2s_glu", x, d, w.shape[1], w.shape[2], (x_grouped,),
        lambda: _launch(x, w, None, d, x_grouped, True, fan_out, glu=1),
        then_swiglu(torch_grouped.scatter2scatter), then_swiglu(reference.scatter2scatter),
        tma)


def scatter2scatter_swiglu_bwd(dy, w, h, d: Dispatch, dy_grouped: bool,
                               rows: torch.Tensor | None = None) -> torch.Tensor:
    """dy [M, K] (grouped, or in slot order), w [E, F, K] (the down projection's transposed
    view), h [M, 2F] grouped -> dh [M, 2F] grouped: da = dy @ w per row, then SwiGLU's
    backward, in the GEMM's epilogue (our kernels) or by the SwiGLU kernel after PyTorch's
    grouped matmul or a GEMM per expert, whichever times fastest."""
    from kernels.triton import grouped_tma

    h = h if h.stride(1) == 1 else h.contiguous()  # the epilogue steps its columns by 1

    def then_swiglu(gemm):
        return lambda: swiglu_bwd(h, gemm(dy, w, d, dy_grouped, True, 1), rows)

    tma = None
    if grouped_tma.supports(dy, w, dy_grouped):
        def tma():
            return grouped_tma.scatter2scatter(dy, w, d, dy_grouped, True, 1, glu=2, h=h)
    return _fastest(
        "s2s_glu_bwd", dy, d, w.shape[1], w.shape[2], (dy_grouped,),
        lambda: _launch(dy, w, None, d, dy_grouped, True, 1, glu=2, h=h),
        then_swiglu(torch_grouped.scatter2scatter), then_swiglu(reference.scatter2scatter),
        tma)


def scatter2scatter_swiglu_bwd_combined(dout, w, h, weights, d: Dispatch,
                                        rows: torch.Tensor | None = None):
    """dout [T, K] (the combined output's gradient, token order), w [E, F, K] (the down
    projection's transposed view), h [M, 2F] grouped, weights [T, k] (the combine weights)
    -> (dh [M, 2F] grouped, dweights [T, k] float32): da = weight * (dout @ w) per row, then
    SwiGLU's backward, and dweight = sum of (dout @ w) * a = dout . y per pair, so that the
    expert outputs y need not be kept. In the GEMM's epilogue (our kernels, GLU 3), or by one
    pass of swiglu_bwd_combined after PyTorch's grouped matmul or a GEMM per expert,
    whichever times fastest. rows (the backends' common signature) is not needed: the GEMMs'
    tiles cover the kept rows only, and swiglu_bwd_combined reads each row's expert."""
    from kernels.triton import grouped_tma

    h = h if h.stride(1) == 1 else h.contiguous()
    weights = weights.contiguous()
    k = d.top_k

    def unfused(gemm):
        return lambda: swiglu_bwd_combined(gemm(dout, w, d, False, True, k), h, weights, d)

    tma = None
    if grouped_tma.supports(dout, w, False):
        def tma():
            return grouped_tma.scatter2scatter(dout, w, d, False, True, k, glu=3, h=h,
                                               wts=weights)
    return _fastest(
        "s2s_glu_comb", dout, d, w.shape[1], w.shape[2], (),
        lambda: _launch(dout, w, None, d, False, True, k, glu=3, h=h, wts=weights),
        unfused(torch_grouped.scatter2scatter), unfused(reference.scatter2scatter), tma)


def scatter2scatter_quant(x, wq: QuantWeight, d: Dispatch, x_grouped: bool, y_grouped: bool,
                          fan_out: int):
    """scatter2scatter with int8 / int4 / MXFP4 / FP8 weights wq [E, N, K], dequantized
    inside the GEMM (inference; no gradient)."""
    return _launch(x, wq.data, wq, d, x_grouped, y_grouped, fan_out)


def s2s_output(x: torch.Tensor, d: Dispatch, n: int, y_grouped: bool) -> torch.Tensor:
    """The [M, n] output of a scatter2scatter: zeros where slot-order rows of dropped pairs
    are read as zeros (no kernel writes them), else uninitialised."""
    if not y_grouped and d.may_drop:
        return torch.zeros(d.num_pairs, n, dtype=x.dtype, device=x.device)
    return common.empty(d.num_pairs, n, dtype=x.dtype, device=x.device)


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def scratch(device: torch.device) -> torch.Tensor:
    """A float32 element that launches without GLU 3 pass as PART (the autotuner zeroes
    PART before each trial of a config, so no output may stand in for it)."""
    if device not in _SCRATCH:
        _SCRATCH[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _SCRATCH[device]


def glu_parts(d: Dispatch, n: int, device: torch.device) -> torch.Tensor:
    """The zeroed [tiles, M] float32 partial sums of a GLU 3 launch over n columns, a row for
    each column tile of the narrowest tile any config takes (wider ones leave rows 0)."""
    return torch.zeros(triton.cdiv(n, 32 if interpreting() else 64), d.num_pairs,
                       dtype=torch.float32, device=device)


def glu_buffers(x, d: Dispatch, n: int, y_grouped: bool, glu: int,
                h: torch.Tensor | None, wts: torch.Tensor | None):
    """The outputs and SwiGLU operands of a grouped GEMM launch whose weights give n output
    columns -> (N: the columns a program tiles over, y, h, part, (H, WTS, PART, stride_hm,
    stride_part): the kernel's operands, stand-ins where glu does not use them)."""
    N = n // 2 if glu == 1 else n
    if glu == 1:  # a, written beside y = h
        h = common.empty(d.num_pairs, N, dtype=x.dtype, device=x.device)
    part = glu_parts(d, N, x.device) if glu == 3 else None
    y = s2s_output(x, d, 2 * N if glu else N, y_grouped)
    operands = (y if h is None else h, y if wts is None else wts.reshape(-1),
                scratch(x.device) if part is None else part,
                y.stride(0) if h is None else h.stride(0), 0 if part is None else part.stride(0))
    return N, y, h, part, operands


def glu_outputs(y, h, part, glu: int, d: Dispatch):
    """What a launch with this glu returns: y (0, 2), (h, a) (1), (dh, the weights' gradient
    [T, k] float32) (3)."""
    if glu == 1:
        return y, h
    if glu == 3:
        return y, part.sum(0).view(d.num_tokens, d.top_k)
    return y


def _launch(x, w, q: QuantWeight | None, d: Dispatch, x_grouped, y_grouped, fan_out,
            glu: int = 0, h: torch.Tensor | None = None, wts: torch.Tensor | None = None):
    """w: the weights, or q's packed integers (then N, K and the scales come from q).
    glu 1: w [E, 2F, K] -> (h [M, 2F], a [M, F]) grouped; glu 2: w [E, F, K], h [M, 2F]
    grouped -> dh [M, 2F] grouped; glu 3: as 2 from x in token order, with the combine
    weights wts [T, k] -> (dh, their gradient [T, k] float32) (see _scatter2scatter_kernel)."""
    N, K = (w.shape[1], w.shape[2]) if q is None else (q.shape[1], q.shape[2])
    N, y, h, part, (H, WTS, PART, stride_hm, stride_part) = glu_buffers(x, d, N, y_grouped,
                                                                        glu, h, wts)
    if d.num_pairs == 0:
        return glu_outputs(y, h, part, glu, d)
    block_m = pick_block_m(d, x.element_size())
    block_expert, block_row, grid_m = block_schedule(d, block_m)

    def grid(meta):
        return (grid_m * triton.cdiv(N, meta["BLOCK_N"]),)

    sc = q.scale if q is not None else w
    _scatter2scatter_kernel[grid](
        x, w, sc, y, H, WTS, PART, d.sorted_pair_idx, block_expert, block_row,
        d.expert_offsets, N, K, d.num_experts, grid_m,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        sc.stride(0), sc.stride(1), sc.stride(2), y.stride(0), y.stride(1),
        stride_hm, stride_part,
        FAN_OUT=fan_out, X_GROUPED=x_grouped, Y_GROUPED=y_grouped,
        PRECISION=dot_precision(x.dtype), UPCAST=interpreting(), GROUP_M=GROUP,
        BITS=0 if q is None else q.bits, QGROUP=1 if q is None else q.group,
        FP4=q is not None and q.fp4, FP8=0 if q is None else ("", *FP8_FORMATS).index(q.fp8),
        QROWS=1 if q is None else q.row_group, GLU=glu, BLOCK_M=block_m,
    )
    return glu_outputs(y, h, part, glu, d)


def _wgrad_configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16}, num_warps=4,
                              num_stages=1)]
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bn, bk, bm, w, s in [
            (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 32, 8, 3),
        ]
    ]
    # float32 (no tensor cores: the dot's operands and its accumulator in registers)
    wide = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32}, num_warps=4,
                          num_stages=3)]
    return configs + wide if autotuning() else wide  # untuned (tests): builds for any dtype


def _wgrad_fitting(configs, named_args, **kwargs):
    """16-bit inputs take the tensor-core tiles, 4-byte ones the 64 x 64 tile: the larger
    ones spilled up to 128 bytes a thread on sm_90 (bench/kernels_offline.py)."""
    small = named_args["X"].element_size() >= 4
    return [c for c in configs
            if (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 64) == small] or configs


@triton.autotune(do_bench=common.bench, configs=_wgrad_configs(), key=["N", "K"],
                 reset_to_zero=[], prune_configs_by={"early_config_prune": _wgrad_fitting})
@triton.jit
def _group_weight_grad_kernel(
    X, DY, DW, offsets,
    N, K,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wn, stride_wk,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[e] tile [BLOCK_N, BLOCK_K] = sum over expert e's rows of dy^T x, both grouped."""
    # expert-major launch order (axis 0 varies fastest): resident programs share one expert's rows
    e = tl.program_id(1)
    pid_n, pid_k = swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = cols_n < N
    k_mask = cols_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = rows < end
        dy_t = tl.load(DY + rows[None, :] * stride_dym + cols_n[:, None] * stride_dyn,
                       mask=m_mask[None, :] & n_mask[:, None], other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + cols_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            dy_t, x = dy_t.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    dw_ptrs = (DW + e.to(tl.int64) * stride_we + cols_n[:, None] * stride_wn
               + cols_k[None, :] * stride_wk)
    tl.store(dw_ptrs, cast_out(acc, DW.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def group_weight_grad(x, dy, d: Dispatch, x_grouped: bool, x_fan_out: int, dy_grouped: bool):
    """x rows [., K], dy rows [., N] -> dw [E, N, K]; every expert written (zeros if no rows).
    Rows in token or slot order are gathered into expert order first, once for whichever
    implementation runs (one copy of them, as ScatterMoE groups x for its weight gradient):
    our kernels read expert-ordered rows only, since a gather inside their loop (its row
    indices loaded there) left that operand single-buffered (bench/kernels_offline.py: 65.5
    against 97 KiB of shared memory at 3 stages). Then our kernel (cp.async or TMA tiles), or
    PyTorch's grouped matmul or a GEMM per expert where one times faster."""
    from kernels.triton import grouped_tma

    x = reference.sorted_rows(x, d, x_grouped, x_fan_out, d.num_pairs)
    dy = reference.sorted_rows(dy, d, dy_grouped, 1, d.num_pairs)
    tma = None
    if grouped_tma.supports_wgrad(x, dy):
        def tma():
            return grouped_tma.group_weight_grad(x, dy, d)
    return _fastest(
        "wgrad", x, d, dy.shape[1], x.shape[1], (),
        lambda: _weight_grad(x, dy, d),
        lambda: torch_grouped.group_weight_grad(x, dy, d, True, 1, True),
        lambda: reference.group_weight_grad(x, dy, d, True, 1, True), tma)


def _weight_grad(x, dy, d: Dispatch):
    """Expert-ordered rows x [M, K], dy [M, N] -> dw [E, N, K] (our cp.async kernel)."""
    N, K, E = dy.shape[1], x.shape[1], d.num_experts
    dw = common.empty(E, N, K, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), E)

    _group_weight_grad_kernel[grid](
        x, dy, dw, d.expert_offsets,
        N, K,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        PRECISION=dot_precision(x.dtype), UPCAST=interpreting(), GROUP_N=GROUP,
    )
    return dw
