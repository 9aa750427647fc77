"""Weight-only int8 / int4 quantization of expert matrices (symmetric, group-wise scales),
MXFP4 (E2M1 codes, one power-of-two scale per 32 columns) and block-scaled FP8 (E4M3 / E5M2
codes, one float32 scale per rows x cols block) as checkpoints store them.

Quantized once at load (serve/store.py), or read packed from an MXFP4 / FP8 checkpoint; the bytes
that cross to the device are the packed codes and their scales, and the device keeps them
packed: `grouped_linear` takes a `QuantWeight` stack and dequantizes inside the GEMM (Triton)
or per expert (torch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

INT4_GROUP = 64
# E2M1 code -> value (MXFP4): sign bit 3, exponent bits 2-1, mantissa bit 0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass
class QuantWeight:
    """w [..., rows, cols] as data (int8 [..., rows, cols_p] or uint8 [..., rows, cols_p / 2]
    holding two 4-bit values a byte, the even column in the low nibble) and scale (float32
    [..., rows, cols_p / group]); cols_p pads cols to the group size. Leading dims stack
    experts (a slot pool). A 4-bit value is an integer offset by 8, or with fp4 an E2M1 code
    (MXFP4: sign bit 3, exponent bits 2-1, mantissa bit 0) whose scale is a uint8 E8M0
    exponent s (2^(s - 127); the Triton GEMM reads s = 0, 2^-127, as 0).
    With fp8 ("e4m3" or "e5m2"), data holds the 8-bit float codes as uint8 [..., rows, cols]
    and scale is float32 [..., rows / row_group, cols / group]: a block of row_group rows
    shares its scales (rows and cols multiples of the block)."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int
    cols: int
    fp4: bool = False
    fp8: str = ""
    row_group: int = 1

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    @property
    def shape(self) -> torch.Size:
        """The logical shape of the weight: [..., rows, cols]."""
        return torch.Size((*self.data.shape[:-1], self.cols))

    def __getitem__(self, i) -> QuantWeight:
        """One expert (or a range) of a stack, as a view."""
        return replace(self, data=self.data[i], scale=self.scale[i])

    def pin_memory(self) -> QuantWeight:
        return replace(self, data=self.data.pin_memory(), scale=self.scale.pin_memory())

    def to(self, device: torch.device | str) -> QuantWeight:
        return replace(self, data=self.data.to(device), scale=self.scale.to(device))

    def copy_(self, src: QuantWeight, non_blocking: bool = False) -> QuantWeight:
        self.data.copy_(src.data, non_blocking=non_blocking)
        self.scale.copy_(src.scale, non_blocking=non_blocking)
        return self

    def empty_stack(self, n: int, device: torch.device | str) -> QuantWeight:
        """n uninitialised experts shaped like this one, stacked, on device."""
        return replace(self, data=torch.empty(n, *self.data.shape, dtype=self.data.dtype,
                                              device=device),
                       scale=torch.empty(n, *self.scale.shape, dtype=self.scale.dtype,
                                         device=device))


def quantize(w: torch.Tensor, bits: int) -> QuantWeight:
    """w [rows, cols] float -> QuantWeight: int8 with one scale per row, or int4 with one
    scale per INT4_GROUP columns."""
    if bits not in (4, 8):
        raise ValueError(f"quantization supports 8 or 4 bits, got {bits}")
    rows, cols = w.shape
    group = cols if bits == 8 else min(INT4_GROUP, cols + cols % 2)
    cols_p = -(-cols // group) * group
    w = torch.nn.functional.pad(w.float(), (0, cols_p - cols)).view(rows, cols_p // group, group)
    qmax = 127 if bits == 8 else 7
    scale = w.abs().amax(-1).clamp(min=1e-12) / qmax
    q = torch.round(w / scale[..., None]).clamp(-qmax - 1, qmax).view(rows, cols_p)
    if bits == 8:
        return QuantWeight(q.to(torch.int8), scale, 8, group, cols)
    u = (q + 8).to(torch.uint8)
    return QuantWeight(u[:, 0::2] | (u[:, 1::2] << 4), scale, 4, group, cols)


def dequantize(q: QuantWeight, dtype: torch.dtype, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """QuantWeight [..., rows, cols] -> w in dtype (written into out when given)."""
    lead = q.data.shape[:-1]
    if q.fp8:
        vals = q.data.view(FP8_FORMATS[q.fp8]).to(torch.float32)
    elif q.bits == 8:
        vals = q.data.to(torch.float32)
    elif q.fp4:
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=q.data.device)
        b = q.data.to(torch.int64)
        vals = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).view(*lead, -1)
    else:
        lo = (q.data & 0xF).to(torch.int8) - 8
        hi = (q.data >> 4).to(torch.int8) - 8
        vals = torch.stack([lo, hi], dim=-1).view(*lead, -1).to(torch.float32)
    scale = q.scale.repeat_interleave(q.row_group, -2) if q.row_group > 1 else q.scale
    if q.fp4:
        scale = torch.ldexp(torch.ones_like(scale, dtype=torch.float32),
                            scale.to(torch.int32) - 127)
    w = (vals.view(*lead, -1, q.group) * scale[..., None]).view(*lead, -1)[..., :q.cols]
    if out is None:
        return w.to(dtype)
    return out.copy_(w)


def fp8_weight(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> QuantWeight:
    """codes [rows, cols] float8 (e4m3fn or e5m2) and scale [rows / bo, cols / bi] (one per
    block of an FP8 block-scaled checkpoint; rows, cols multiples of block = (bo, bi)) -> the
    weight as a QuantWeight holding them as stored (the expert GEMMs dequantize them)."""
    fmt = {v: k for k, v in FP8_FORMATS.items()}.get(codes.dtype)
    (rows, cols), (bo, bi) = codes.shape[-2:], block
    if fmt is None or rows % bo or cols % bi \
            or tuple(scale.shape[-2:]) != (rows // bo, cols // bi):
        raise ValueError(f"an FP8 weight needs float8 codes whose sizes are multiples of the "
                         f"block {block} and a scale per block, got {tuple(codes.shape)} "
                         f"{codes.dtype}, scales {tuple(scale.shape)}")
    return QuantWeight(codes.view(torch.uint8), scale.float(), 8, bi, cols, fp8=fmt,
                       row_group=bo)
