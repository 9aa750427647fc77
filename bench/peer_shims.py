"""Torch stand-ins for the kernel-bench peers' CUDA extensions, so that MegaBlocks' dMoE and
megatron-core's GroupedMLP run as peers in bench/kernels.py without nvcc (`install()`
registers MegaBlocks' two under the extensions' names, `install_grouped_gemm()` the one that
megatron-core uses):

- `megablocks_ops`: the small index ops around the expert GEMMs (cumsum, histogram, key sort,
  the block-sparse topology's column indices, replicate);
- `grouped_gemm` (tgale96/grouped_gemm, what dMoE's `mlp_impl="grouped"` calls): the grouped
  GEMM, here `torch._grouped_mm` (CUTLASS on Hopper; a reference loop on the CPU). The same
  package is what megatron-core's legacy `GroupedMLP` calls (`install_grouped_gemm()` alone).

`patch_megatron_router_gemm()` mends one megatron-core 0.16.1 bug that only a GPU without
Transformer Engine meets: its router's gating GEMM reads `te_general_gemm`, a name bound only
when Transformer Engine imports (NameError otherwise, seen on the lent H200 on 2026-11-30).

MegaBlocks' routing, permutation (its Triton gather / scatter) and expert MLP are its own
code. Each function keeps the extension's signature and writes into `out` the same way.
Its sparse path (stk's block-sparse Triton kernels) refuses Triton >= 3.2, so the grouped path
is the one that runs.
"""
from __future__ import annotations

import sys
import types

import torch

# ---- megablocks_ops ------------------------------------------------------------------------


def exclusive_cumsum(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """x, out: [B, N] integer; out[b, i] = sum(x[b, :i])."""
    out.copy_(torch.cumsum(x, dim) - x)


def inclusive_cumsum(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """x, out: [B, N] integer; out[b, i] = sum(x[b, :i + 1])."""
    out.copy_(torch.cumsum(x, dim))


def histogram(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """x: [N] or [B, N] integer -> int32 counts [num_bins] or [B, num_bins]; values outside
    [0, num_bins) are not counted (as cub's HistogramEven)."""
    rows = x.view(1, -1) if x.dim() == 1 else x
    inside = (rows >= 0) & (rows < num_bins)
    flat = (rows.long().clamp(0, num_bins - 1)
            + num_bins * torch.arange(rows.shape[0], device=x.device)[:, None])[inside]
    counts = torch.zeros(rows.shape[0] * num_bins, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    counts = counts.view(rows.shape[0], num_bins)
    return counts.flatten() if x.dim() == 1 else counts


def sort(x: torch.Tensor, end_bit: int, x_out: torch.Tensor, iota_out: torch.Tensor) -> None:
    """Stable key sort of x [N] (keys below 2**end_bit): x_out the sorted keys, iota_out their
    original positions, both in x's dtype."""
    keys, order = torch.sort(x, stable=True)
    x_out.copy_(keys)
    iota_out.copy_(order)


def _bin_of(bins: torch.Tensor, n: int) -> torch.Tensor:
    """bins: inclusive cumsum [nbins] -> [n] int64, the bin holding each of positions 0..n-1."""
    pos = torch.arange(n, device=bins.device, dtype=bins.dtype)
    return torch.searchsorted(bins, pos, right=True)


def indices(padded_bins: torch.Tensor, block_size: int, output_block_rows: int,
            output_block_columns: int, out: torch.Tensor) -> None:
    """Column indices of the block-diagonal topology, out [rows * cols] int16: row block r of
    expert b holds b * cols + (0 .. cols - 1). padded_bins: inclusive cumsum [E] of each
    expert's rows, padded to block_size."""
    if out.numel() == 0:
        return
    expert = _bin_of(padded_bins // block_size, output_block_rows)
    cols = torch.arange(output_block_columns, device=out.device)
    out.copy_((expert[:, None] * output_block_columns + cols[None, :]).flatten())


def replicate_forward(x: torch.Tensor, bins: torch.Tensor, out: torch.Tensor) -> None:
    """x [B, nbins], bins inclusive cumsum [nbins] -> out [B, N]: column j is x's column of
    the bin holding j."""
    out.copy_(x[:, _bin_of(bins, out.shape[1])])


def replicate_backward(grad: torch.Tensor, bins: torch.Tensor, out: torch.Tensor) -> None:
    """grad [B, N] -> out [B, nbins]: the sum of each bin's columns."""
    out.zero_()
    out.index_add_(1, _bin_of(bins, grad.shape[1]), grad)


# ---- grouped_gemm --------------------------------------------------------------------------


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_a: bool = False,
        trans_b: bool = False, c: torch.Tensor | None = None) -> torch.Tensor:
    """grouped_gemm.backend.gmm. batch_sizes [E] int64 (on the CPU): rows of a per group.
    trans_a False: a [M, K] @ b [E, K, N] (b [E, N, K] with trans_b) -> [M, N].
    trans_a True: a [M, K1]^T @ b [M, K2] per group -> [E, K1, K2] (a weight gradient).
    c, when given, receives the result (and is returned)."""
    offs = torch.cumsum(batch_sizes.to(a.device), 0).to(torch.int32)
    if trans_a:
        out = torch._grouped_mm(a.t(), b, offs=offs)
    else:
        out = torch._grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=offs)
    if c is None:
        return out
    c.copy_(out)
    return c


class _GroupedGemm(torch.autograd.Function):
    """grouped_gemm.ops.gmm: gmm with its gradients for a and b."""

    @staticmethod
    def forward(ctx, a, b, batch_sizes, trans_b):
        ctx.save_for_backward(a, b, batch_sizes)
        ctx.trans_b = trans_b
        return gmm(a, b, batch_sizes, trans_b=trans_b)

    @staticmethod
    def backward(ctx, grad):
        a, b, batch_sizes = ctx.saved_tensors
        grad = grad.contiguous()
        da = db = None
        if ctx.needs_input_grad[0]:
            da = gmm(grad, b, batch_sizes, trans_b=not ctx.trans_b)
        if ctx.needs_input_grad[1]:
            db = (gmm(grad, a, batch_sizes, trans_a=True) if ctx.trans_b
                  else gmm(a, grad, batch_sizes, trans_a=True))
        return da, db, None, None


def gmm_op(a, b, batch_sizes, trans_b: bool = False) -> torch.Tensor:
    return _GroupedGemm.apply(a, b, batch_sizes, trans_b)


def install_grouped_gemm() -> None:
    """Register the `grouped_gemm` stand-in (before megablocks or megatron-core's MoE experts
    module is imported: both bind the package at import)."""
    gg = types.ModuleType("grouped_gemm")
    gg.backend = types.ModuleType("grouped_gemm.backend")
    gg.backend.gmm = gmm
    gg.ops = types.ModuleType("grouped_gemm.ops")
    gg.ops.gmm = gmm_op
    sys.modules.update({"grouped_gemm": gg, "grouped_gemm.backend": gg.backend,
                        "grouped_gemm.ops": gg.ops})


def patch_megatron_router_gemm() -> None:
    """Bind megatron-core's `moe_utils.te_general_gemm` to None where Transformer Engine did
    not import: its RouterGatingLinearFunction then takes its own torch.mm path (it tests
    `te_general_gemm is not None`) instead of raising NameError."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install() -> None:
    """Register the stand-ins as `megablocks_ops` and `grouped_gemm` (before megablocks is
    imported)."""
    ops = types.ModuleType("megablocks_ops")
    for fn in (exclusive_cumsum, inclusive_cumsum, histogram, sort, indices,
               replicate_forward, replicate_backward):
        setattr(ops, fn.__name__, fn)
    sys.modules["megablocks_ops"] = ops
    install_grouped_gemm()
