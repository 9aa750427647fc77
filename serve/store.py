"""The weights of a Hugging Face MoE directory, read lazily from its safetensors files.

Non-expert tensors are read on request (memory-mapped) for the device. Experts live in one of
two host tiers: RAM (pinned when serving on CUDA) up to a host budget, and the memory-mapped
files beyond it (int8 / int4 experts beyond it go to a file written once at load; an MXFP4
checkpoint's experts are read packed from its own files).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.quant import QuantWeight, dequantize, fp8_weight, quantize
from moe.config import ModelConfig
from moe.hf_fp8 import FP8_DTYPES, fp8_block, fp8_dequantize
from moe.hf_import import dense_tensor, hf_model_config, read_expert
from moe.hf_names import dense_tensor_names, expert_sources, expert_tensor_names, is_mxfp4
from serve.config import QUANT_CHOICES
from serve.units import format_size

QUANT_BITS = {"none": None, "int8": 8, "int4": 4, "mxfp4": 4, "fp8": 8}


class ModelDirError(ValueError):
    """A model directory that cannot be served: missing, partial or of another architecture."""


@dataclass
class ExpertWeights:
    """One expert: w_in [2F, d] (gate; up), w_out [d, F], as tensors or QuantWeights, and
    the biases b_in [2F], b_out [d] of families that have them (GPT-OSS; never quantized)."""

    w_in: torch.Tensor | QuantWeight
    w_out: torch.Tensor | QuantWeight
    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts())

    def dense(self, dtype: torch.dtype) -> ExpertWeights:
        """The expert with FP8 weights kept as stored dequantized to dtype (int8 / int4 /
        MXFP4 ones stay packed: the GEMMs take them)."""
        def widen(w):
            return dequantize(w, dtype) if isinstance(w, QuantWeight) and w.fp8 else w

        return ExpertWeights(widen(self.w_in), widen(self.w_out), self.b_in, self.b_out)

    def parts(self) -> list:
        return [t for t in (self.w_in, self.w_out, self.b_in, self.b_out) if t is not None]

    def pin_memory(self) -> ExpertWeights:
        return ExpertWeights(*(t.pin_memory() if t is not None else None
                               for t in (self.w_in, self.w_out, self.b_in, self.b_out)))


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it; ModelDirError for a missing shard."""
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).exists()})
        if missing:
            raise ModelDirError(f"partial model directory {model_dir}: shard file(s) "
                                f"{', '.join(missing)} listed in {index.name} are missing")
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"{model_dir} has no .safetensors files")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({name: f for name in h.keys()})
    return out


def available_ram() -> int:
    """Bytes of RAM the system can give without swapping (Linux's MemAvailable: free memory
    and the page cache it may reclaim), else the free pages; 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _not_a_model_dir(path: Path) -> str:
    """Why `path` cannot be served, and, for one of our training runs or checkpoints, how
    to make it servable."""
    if not path.is_dir():
        return f"model directory {path} does not exist"
    if any((path / marker).exists() for marker in
           ("model_config.json", "latest", "checkpoints/latest")):
        return (f"{path} is a training run or checkpoint, not a model directory: export it "
                f"first (python -m train.export {path} OUT) and serve OUT")
    return f"{path} is not a model directory (no config.json)"


class WeightStore:
    """model_dir -> config (ours), dense tensors on request, experts by (layer, expert).

    dtype: the compute dtype experts are converted to. quant: "none", "int8", "int4",
    "mxfp4" (an MXFP4 checkpoint's experts kept packed as stored) or "auto" (mxfp4 for an
    MXFP4 checkpoint, else none).
    host_budget: bytes of experts kept in RAM (None: what fits in available RAM, keeping
    4 GiB free); the rest is read from the memory-mapped files on every fetch.
    """

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                 quant: str = "none", host_budget: int | None = None, pin: bool = False,
                 offload_dir: str | Path | None = None, verbose: bool = False,
                 tiers: bool = True):
        """tiers=False: only the first expert is read (its size); no RAM tier, nothing
        quantized to disk (moe-serve plan)."""
        self.dir = Path(model_dir)
        if quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
        self.dtype = dtype
        if not (self.dir / "config.json").exists():
            raise ModelDirError(_not_a_model_dir(self.dir))
        self.hf_config = json.loads((self.dir / "config.json").read_text())
        try:
            self.cfg, self.family, _ = hf_model_config(self.hf_config)
        except ValueError as e:
            raise ModelDirError(str(e)) from e
        self.cfg: ModelConfig
        mxfp4 = is_mxfp4(self.hf_config)
        self.fp8_block = fp8_block(self.hf_config)  # weights dequantized as they are read
        fp8_not = self.why_not_fp8()  # why the experts cannot stay FP8 (None: they can)
        if quant == "auto":  # MXFP4 / FP8 checkpoints' experts as stored; others as they are
            quant = "mxfp4" if mxfp4 else "fp8" if fp8_not is None else "none"
        if quant == "mxfp4" and not mxfp4:
            raise ModelDirError(f"--quant mxfp4 keeps an MXFP4 checkpoint's experts packed, "
                                f"and {self.dir} is not one; use int4 or int8 to quantize "
                                "its experts at load")
        if quant == "fp8" and fp8_not is not None:
            raise ModelDirError(f"--quant fp8 keeps an FP8 checkpoint's experts as stored, "
                                f"and {self.dir} {fp8_not}")
        self.quant, self.bits = quant, QUANT_BITS[quant]
        self.files = _tensor_files(self.dir)
        self._handles: dict[Path, object] = {}
        self.moe_layers = [i for i in range(self.cfg.n_layers) if self.cfg.is_moe_layer(i)]
        self.num_experts = self.cfg.moe.num_experts
        self.total_experts = len(self.moe_layers) * self.num_experts  # (layer, expert) keys
        self._check_complete()
        self.host: dict[tuple[int, int], ExpertWeights] = {}
        self._offload: dict[int, Path] = {}
        self.expert_nbytes = self._read_expert(self.moe_layers[0], 0).nbytes \
            if self.moe_layers else 0
        if tiers:
            self._fill_host_tier(host_budget, pin, offload_dir, verbose)
        else:
            self.n_host, self.n_disk = 0, self.total_experts

    def why_not_fp8(self) -> str | None:
        """None when the experts can stay FP8 as stored (an FP8 block-scaled checkpoint,
        experts apart, sizes multiples of the block), else why not."""
        if self.fp8_block is None:
            return "is not one (quant_method fp8 with a weight_block_size)"
        if self.family == "gpt_oss":
            return "stacks its experts"
        (bo, bi), m = self.fp8_block, self.cfg
        if any(n % b for n in (m.moe.expert_ffn, m.d_model) for b in (bo, bi)):
            return (f"has expert sizes ({m.moe.expert_ffn}, {m.d_model}) that are not "
                    f"multiples of its block {self.fp8_block}")
        return None

    # -- reading -------------------------------------------------------------------------
    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def _get(self, name: str, e: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its e-th slice (stacked experts: only that expert is read); an
        FP8 block-scaled weight dequantized to self.dtype."""
        h = self._handle(self.files[name])
        t = h.get_tensor(name) if e is None else h.get_slice(name)[e:e + 1][0]
        if t.dtype in FP8_DTYPES and self.fp8_block is not None:
            scale = name + "_scale_inv"
            if scale not in self.files:
                raise ModelDirError(f"{self.dir}: fp8 tensor {name} has no {scale}")
            t = fp8_dequantize(t, self._get(scale, e), self.fp8_block, self.dtype)
        return t

    def _fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 weight `name` as stored: codes [out, in], block scales [out / bo, in / bi]."""
        h = self._handle(self.files[name])
        codes = h.get_tensor(name)
        if codes.dtype not in FP8_DTYPES or name + "_scale_inv" not in self.files:
            raise ModelDirError(f"{self.dir}: expert weight {name} is not FP8 with scales "
                                "(--quant none dequantizes what is)")
        return codes, self._handle(self.files[name + "_scale_inv"]).get_tensor(
            name + "_scale_inv").float()

    def _dense_names(self) -> dict[str, list[str]]:
        """Our non-expert names -> the Hub tensors they are made of. A tied LM head is left
        out (it is the embedding); an untied one the directory lacks reads the embeddings."""
        names = dense_tensor_names(self.cfg, self.family)
        if self.cfg.tie_embeddings:
            names.pop("lm_head.weight")
        elif "lm_head.weight" not in self.files:
            names["lm_head.weight"] = ["model.embed_tokens.weight"]
        return names

    def _check_complete(self) -> None:
        need = [h for hubs in self._dense_names().values() for h in hubs]
        need += [n for i in self.moe_layers
                 for n in expert_sources(self.hf_config, self.family, i, self.num_experts)]
        missing = [n for n in need if n not in self.files]
        if missing:
            raise ModelDirError(f"partial model directory {self.dir}: {len(missing)} tensor(s) "
                                f"missing, e.g. {', '.join(missing[:3])}")

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Our names of every non-expert tensor (a tied LM head left out) -> tensor in
        self.dtype (on the CPU)."""
        out = {}
        for ours, hubs in self._dense_names().items():
            parts = [self._get(h) for h in hubs]
            out[ours] = dense_tensor(self.hf_config, self.cfg, ours, parts).to(self.dtype)
        return out

    def dense_nbytes(self) -> int:
        """Bytes the non-expert tensors take in self.dtype."""
        el = torch.finfo(self.dtype).bits // 8
        total = 0
        for hubs in self._dense_names().values():
            for h in hubs:
                shape = self._handle(self.files[h]).get_slice(h).get_shape()
                total += el * int(torch.Size(shape).numel())
        return total

    def _read_expert(self, layer: int, e: int) -> ExpertWeights:
        if self.quant == "fp8":  # the codes and block scales as stored (gate; up rows)
            g, u, dn = (self._fp8(n) for n in expert_tensor_names(self.family, layer, e))
            return ExpertWeights(fp8_weight(torch.cat([g[0], u[0]]), torch.cat([g[1], u[1]]),
                                            self.fp8_block), fp8_weight(*dn, self.fp8_block))
        packed = self.quant == "mxfp4"  # the checkpoint's codes as they are
        w_in, w_out, b_in, b_out = read_expert(self.hf_config, self.family, layer, e,
                                               self._get, packed)
        b_in, b_out = (None if b is None else b.to(self.dtype) for b in (b_in, b_out))
        if not packed:
            w_in, w_out = w_in.to(self.dtype), w_out.to(self.dtype)
            if self.bits is not None:
                w_in, w_out = quantize(w_in, self.bits), quantize(w_out, self.bits)
        return ExpertWeights(w_in, w_out, b_in, b_out)

    def in_ram(self, key: tuple[int, int]) -> bool:
        """Whether expert key = (layer, e) is in the RAM tier (else read from disk)."""
        return key in self.host

    def expert(self, layer: int, e: int) -> ExpertWeights:
        """One expert's weights from the RAM tier, or read from the disk tier."""
        hit = self.host.get((layer, e))
        if hit is not None:
            return hit
        if layer in self._offload:  # quantized once at load, memory-mapped here
            h = self._handle(self._offload[layer])
            biases = [h.get_tensor(f"{e}.{b}") if self.cfg.moe.expert_bias else None
                      for b in ("b_in", "b_out")]
            return ExpertWeights(*(QuantWeight(h.get_tensor(f"{e}.{w}.data"),
                                               h.get_tensor(f"{e}.{w}.scale"), self.bits,
                                               *json.loads(h.metadata()[f"{e}.{w}"]))
                                   for w in ("w_in", "w_out")), *biases)
        return self._read_expert(layer, e)

    # -- tiers -----------------------------------------------------------------------------
    def _fill_host_tier(self, host_budget, pin, offload_dir, verbose) -> None:
        total = self.total_experts
        if host_budget is None:
            host_budget = max(0, available_ram() - 4 * 2**30)
        n_host = min(total, host_budget // max(self.expert_nbytes, 1))
        self.n_host, self.n_disk = n_host, total - n_host
        keys = [(i, e) for i in self.moe_layers for e in range(self.num_experts)]
        for n, key in enumerate(keys[:n_host]):
            w = self._read_expert(*key)
            self.host[key] = w.pin_memory() if pin else w
            if verbose and (n + 1) % self.num_experts == 0:
                print(f"  experts in RAM: {n + 1}/{total}", file=sys.stderr, flush=True)
        if self.bits is None or self.quant in ("mxfp4", "fp8") or not self.n_disk:
            return  # read from the checkpoint's memory-mapped files (MXFP4 / FP8: as stored)
        # quantized experts that miss RAM: quantize once, keep in a memory-mapped file
        import tempfile

        if offload_dir is None:  # removed with the store (or at exit)
            self._tmp = tempfile.TemporaryDirectory(prefix="moe-serve-offload-")
        root = Path(offload_dir or self._tmp.name)
        root.mkdir(parents=True, exist_ok=True)
        self.offload_root = root
        for layer in sorted({i for i, _ in keys[n_host:]}):
            tensors, meta = {}, {}
            for i, e in keys[n_host:]:
                if i != layer:
                    continue
                w = self._read_expert(i, e)
                for name, q in (("w_in", w.w_in), ("w_out", w.w_out)):
                    tensors[f"{e}.{name}.data"] = q.data.contiguous()
                    tensors[f"{e}.{name}.scale"] = q.scale.contiguous()
                    meta[f"{e}.{name}"] = json.dumps([q.group, q.cols, q.fp4])
                for name, b in (("b_in", w.b_in), ("b_out", w.b_out)):
                    if b is not None:
                        tensors[f"{e}.{name}"] = b.contiguous()
            path = root / f"experts-layer{layer}-{self.quant}.safetensors"
            save_file(tensors, str(path), metadata=meta)
            self._offload[layer] = path
        if verbose:
            print(f"  quantized experts on disk: {self.n_disk} in {root}", file=sys.stderr)

    def describe(self) -> str:
        return (f"{self.family} {self.cfg.n_layers} layers, {self.num_experts} experts x "
                f"{len(self.moe_layers)} MoE layers, {format_size(self.expert_nbytes)} per "
                f"expert ({self.quant}); {self.n_host} experts in RAM, {self.n_disk} on disk")
