"""FP8 block-scaled checkpoints (quantization_config quant_method "fp8" with a
weight_block_size, as DeepSeek-V3 / R1, Qwen3-*-FP8 and MiniMax-M2 ship): a linear
weight W [out, in] is stored as float8 codes beside `<name>_scale_inv` [ceil(out / bo),
ceil(in / bi)], one scale per (bo x bi) block, W = codes * scale. Read, the weights are
dequantized to the compute dtype (weight-only: activations are not quantized, so answers
are the dequantized model's); tensors without a scale (norms, embeddings, routers, the LM
head) are read as stored. The serve store may keep experts as stored instead
(kernels.quant.fp8_weight): codes and scales cross to the device and stay so in the expert
slots, dequantized inside the expert GEMMs.
"""

from __future__ import annotations

import torch

from kernels.quant import FP8_FORMATS

FP8_DTYPES = tuple(FP8_FORMATS.values())


def fp8_block(hf: dict) -> tuple[int, int] | None:
    """The (rows, cols) weight block of an FP8 block-scaled config.json, None for another
    checkpoint; ValueError names an FP8 scheme this reader does not take."""
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"config.json: an fp8 checkpoint without a weight_block_size of two "
                         f"positive integers (got {block!r}; per-tensor FP8 scales are not "
                         "supported)")
    fmt = quant.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise ValueError(f"config.json: fp8 fmt={fmt!r} is not supported (e4m3, e5m2)")
    return int(block[0]), int(block[1])


def fp8_dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [out, in] float8 and scale_inv [ceil(out / bo), ceil(in / bi)] -> W [out, in]
    in dtype (each block's codes times its scale, in float32)."""
    out, inp = codes.shape
    bo, bi = block
    want = (-(-out // bo), -(-inp // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"fp8 weight of shape {tuple(codes.shape)} with block {block} needs "
                         f"scales of shape {want}, got {tuple(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (codes.float() * scale).to(dtype)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int],
                 dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (codes [out, in] in dtype, scale_inv [ceil(out / bo), ceil(in / bi)]):
    each block scaled so its largest magnitude is the format's largest (tests and tools
    write FP8 checkpoints with it)."""
    out, inp = w.shape
    bo, bi = block
    rows, cols = -(-out // bo), -(-inp // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32)
    padded[:out, :inp] = w.float()
    blocks = padded.view(rows, bo, cols, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    codes = (blocks / scale[:, None, :, None]).view(rows * bo, cols * bi)[:out, :inp]
    return codes.to(dtype), scale

