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

import json
import os
import shutil
import sys
from pathlib import Path

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
    if fmt not in FP8_FORMATS:
        raise ValueError(f"config.json: fp8 fmt={fmt!r} is not supported "
                         f"({', '.join(FP8_FORMATS)})")
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



ROUTER_MODULES = ("gate", "router", "shared_expert_gate")  # [E or 1, d] scores: kept as they are


def fp8_quantizable(name: str, t: torch.Tensor, experts_only: bool = False) -> bool:
    """Whether checkpoint tensor `name` is a linear weight an FP8 block-scaled checkpoint
    stores as codes (DeepSeek-V3's choice): 2-D floating `.weight`s, apart from embeddings,
    the LM head, norms and routers; with experts_only, only the routed experts' (`.experts.`
    in the name)."""
    if t.dim() != 2 or not t.is_floating_point() or t.dtype in FP8_DTYPES \
            or not name.endswith(".weight") or (experts_only and ".experts." not in name):
        return False
    module = name[:-len(".weight")]
    last = module.rsplit(".", 1)[-1]
    return not ("embed" in module or "lm_head" in module or "norm" in last
                or last in ROUTER_MODULES)


def write_fp8_checkpoint(src: Path, dst: Path, block: tuple[int, int] = (128, 128),
                         fmt: str = "e4m3", verbose: bool = True,
                         experts_only: bool = False) -> dict:
    """Copy the Hugging Face checkpoint directory src to dst as an FP8 block-scaled one:
    its linear weights (fp8_quantizable) as `fmt` codes beside `<name>_scale_inv`, shard by
    shard (memory holds one), its other files as they are, config.json with the
    quantization_config that transformers and this project read (experts_only: the routed
    experts' weights alone; attention and the rest stay as they are). -> counts and bytes. It is
    written beside dst (`<dst>.partial`) and renamed to dst when whole: a failed or stopped
    copy leaves no dst behind."""
    src, dst = Path(src), Path(dst)
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 fmt must be one of {', '.join(FP8_FORMATS)}, got {fmt!r}")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"an fp8 block is two positive sizes (rows, cols), got {block!r}")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a model directory (no config.json)")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is quantized already (quantization_config "
                         f"{config['quantization_config'].get('quant_method')!r})")
    if dst.resolve() == src.resolve():
        raise ValueError("the FP8 copy needs a directory of its own (--out is the source)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty directory")
    index = src / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
              if index.exists() else sorted(p.name for p in src.glob("*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"{src} holds no safetensors weights")
    final, dst = dst, dst.with_name(dst.name + ".partial")  # renamed when whole
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    try:
        done = _write_fp8(src, dst, shards, config, block, fmt, verbose, experts_only)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    os.replace(dst, final)
    return done


def _write_fp8(src: Path, dst: Path, shards: list[str], config: dict, block: tuple[int, int],
               fmt: str, verbose: bool, experts_only: bool) -> dict:
    """write_fp8_checkpoint's copy, into dst."""
    from safetensors.torch import load_file, save_file

    index = src / "model.safetensors.index.json"
    weight_map, n_fp8, before, after = {}, 0, 0, 0
    for n, shard in enumerate(shards):
        tensors = load_file(str(src / shard))
        before += sum(t.nbytes for t in tensors.values())
        out = {}
        for name, t in tensors.items():
            if fp8_quantizable(name, t, experts_only):
                out[name], out[name + "_scale_inv"] = fp8_quantize(t, block, FP8_FORMATS[fmt])
                n_fp8 += 1
            else:
                out[name] = t
        del tensors
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        after += sum(t.nbytes for t in out.values())
        weight_map.update(dict.fromkeys(out, shard))
        if verbose:
            print(f"  shard {n + 1}/{len(shards)} {shard}: {n_fp8} weights in fp8 so far",
                  file=sys.stderr, flush=True)
    if index.exists():
        (dst / index.name).write_text(json.dumps(
            {"metadata": {"total_size": after}, "weight_map": weight_map}, indent=2))
    for f in src.iterdir():  # tokenizer, generation config, chat template, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (index.name,
                                                                          "config.json"):
            shutil.copy2(f, dst / f.name)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": fmt,
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return {"weights_fp8": n_fp8, "bytes_before": before, "bytes_after": after,
            "block": list(block), "fmt": fmt}
