"""MXFP4 (OCP microscaling FP4), the format GPT-OSS checkpoints store their experts in:
blocks of 32 E2M1 values sharing one E8M0 scale.

blocks uint8 [..., rows, G, 16] hold two 4-bit codes a byte (the even column in the low
nibble); scales uint8 [..., rows, G] are biased exponents (2 ** (s - 127)). The weight is
[..., rows, 32 G].
"""

from __future__ import annotations

import torch

from kernels.quant import FP4_VALUES, QuantWeight, dequantize

MXFP4_GROUP = 32


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., rows, G, 16], scales uint8 [..., rows, G] -> [..., rows, 32 G] in
    dtype (exact: every value is a code times a power of two)."""
    return dequantize(mxfp4_weight(blocks, scales), dtype)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] (cols a multiple of 32) -> (blocks, scales) of the nearest MXFP4
    values, each block scaled so that its largest magnitude fits 6 (tests and tiny
    checkpoints write their experts this way)."""
    if w.shape[-1] % 32:
        raise ValueError(f"MXFP4 needs a multiple of 32 columns, got {w.shape[-1]}")
    g = w.float().unflatten(-1, (-1, 32))  # [..., G, 32]
    amax = g.abs().amax(-1, keepdim=True).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)
    lut = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    code = (scaled.abs()[..., None] - lut).abs().argmin(-1)  # nearest magnitude
    code = code + 8 * (scaled < 0)
    pairs = code.unflatten(-1, (16, 2))
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


def mxfp4_weight(blocks: torch.Tensor, scales: torch.Tensor) -> QuantWeight:
    """blocks uint8 [..., rows, G, 16], scales uint8 [..., rows, G] -> the same weight as a
    packed QuantWeight [..., rows, 32 G] (codes and exponents as stored: 4.25 bits a
    weight), which the expert GEMMs dequantize tile by tile."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 \
            or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 needs uint8 blocks [..., G, 16] and scales [..., G], got "
                         f"{tuple(blocks.shape)} {blocks.dtype}, {tuple(scales.shape)} "
                         f"{scales.dtype}")
    return QuantWeight(blocks.flatten(-2).contiguous(), scales.contiguous(), 4, MXFP4_GROUP,
                       MXFP4_GROUP * scales.shape[-1], fp4=True)
