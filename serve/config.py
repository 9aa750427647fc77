"""Typed serving configuration: the CLI fills it from its flags over an optional preset (a YAML
file, or one of configs/serve/); tests build it directly."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from serve.prefetch_gate import MIN_PRECISION

CACHE_POLICIES = ("lru", "lfu", "layer", "next-use")  # serve.cache.POLICIES
QUANT_CHOICES = ("auto", "none", "int8", "int4", "mxfp4", "fp8")
MISS_QUANTS = ("none", "int8", "int4")  # the stand-ins' precision (ServeConfig.miss_quant)
KV_CACHE_DTYPES = ("auto", "int8")  # serve.kvcache

_NONE = type(None)
# ServeConfig fields without a list of choices: what each takes (check() names it)
_FIELD_TYPES = {
    "model": ("a path", (str, os.PathLike)), "offload_dir": ("a path", (str, os.PathLike, _NONE)),
    "kernel_backend": ("a string", (str,)),
    "memory_budget": ("a string or an integer", (str, int, _NONE)),
    "host_budget": ("a string or an integer", (str, int, _NONE)),
    "prefetch_min_weight": ("a number", (int, float)),
    "prefetch_min_precision": ("a number", (int, float)),
    "prefetch_fraction": ("a number", (int, float)),
    "max_batch": ("an integer", (int,)), "prefill_chunk": ("an integer", (int,)),
    "max_context": ("an integer", (int, _NONE)),
    "prefix_cache": ("true or false", (bool,)), "cuda_graphs": ("true or false", (bool,)),
    "prefill_step_tokens": ("an integer", (int, _NONE)),
    "host_compute_tokens": ("an integer", (int,)),
    "disk_readers": ("an integer", (int, _NONE)),
    "skip_miss_weight": ("a number", (int, float)),
    "miss_quant_weight": ("a number", (int, float)),
    "miss_quant_slots": ("an integer", (int, _NONE)),
    "speculate": ("an integer", (int,)),
    "draft_model": ("a path", (str, os.PathLike, _NONE)),
    "draft_min_prob": ("a number", (int, float)),
}


@dataclass
class ServeConfig:
    """How a model directory is served.

    device: "auto" (cuda when present, else cpu), "cuda" or "cpu". dtype: "auto" (bfloat16 on
    cuda, float32 on cpu), "float32", "bfloat16" or "float16".
    memory_budget: bytes (or "8GiB") the runtime may keep on the device: non-expert weights,
    KV cache, expert slots and an activation estimate. None: 90% of what the device has free
    (CUDA's free memory; on cpu the RAM the system can give), a slot for every expert when
    they all fit. host_budget: expert bytes kept in host RAM (None: all that fit on cuda, none
    on cpu, where the memory-mapped files are the offload tier).
    disk_readers: threads that read the experts of the disk tier (the memory-mapped files
    beyond host_budget), several at a time and beside the device's work (0: the serving
    thread reads each when it is needed; None: 4 on cuda, 0 on cpu, where every expert is
    read from the page cache and a thread's hand-off costs more than the copy).
    cache_policy: "lru", "lfu", "layer" or "next-use". prefetch: "cross-layer" or "none".
    prefetch_min_weight: copy ahead only the predicted experts whose predicted combine weight
    reaches it for some token (0: every top-k prediction). A wrong prediction is a copy a
    miss would not have made (bench/policies.py), so a higher bar trades hits for bytes.
    prefetch_min_precision: a layer's predicted experts are copied only while the share of
    its recently predicted experts that it then used reaches this (serve/prefetch_gate.py;
    they are scored without copies until then); 0: always copy.
    prefetch_fraction: the share of each predicted expert's bytes copied ahead (1: all). The
    rest is copied when its layer uses it; a wrong prediction then costs only that share of
    the link. Sized to the time the link stands idle between layers (the host's wait for
    the routing and its issue of the next copies: bench/serve_timeline.py), the copy ahead
    fills that gap without delaying the next layer's own copies. Experts in RAM and
    unquantized; the others are copied whole.
    quant: "none", "int8" or "int4" (weight-only experts, kept packed on the device and
    dequantized inside the expert GEMMs), "mxfp4" (an MXFP4 checkpoint's experts, packed as
    stored), "fp8" (an FP8 block-scaled checkpoint's experts as stored, in RAM, on the wire
    and in their device slots, dequantized inside the expert GEMMs: half bf16's bytes, so
    twice the slots) or "auto" (mxfp4 / fp8 for such checkpoints, else none).
    max_batch x max_context tokens of KV cache are reserved (max_context: None = the model's
    context, at most 4096), in the compute dtype, or with kv_cache_dtype "int8" as int8 codes
    with a scale per token, head and 64 channels (serve/kvcache.py: about half the bytes of
    bf16, so more expert slots fit; approximate). prefill_chunk: prompt tokens of a row that
    pass a layer at once (bounds activations). prefill_step_tokens: most prompt tokens a step
    reads while other rows decode, at least a chunk of each reading row (bounds how long they
    wait; None: prompts are read whole, in the same forward as the decode, so experts cross
    once for both).
    host_compute_tokens: a missing expert that at most this many of a step's (token, expert)
    pairs use runs on the host CPU from its host copy, beside the device's work, instead of
    evicting a resident expert to be copied in (as Fiddler does: a CPU reads an expert for a
    few tokens faster than PCIe moves it); 0: every expert runs on the device.
    skip_miss_weight: an expert that is not on the device and that every token using it in
    the step weighs below this (and not as its first choice) is skipped instead of copied
    in, its tokens' other experts scaled up to the same total weight (serve/skip.py): fewer
    PCIe bytes for answers that are no longer exactly the model's (0: off, exact).
    miss_quant, miss_quant_weight: a missing expert that every token using it in the step
    weighs below miss_quant_weight (and not as its first choice) runs from a copy quantized
    to miss_quant ("int8" or "int4", quantized once at load) in a pool of its own
    (miss_quant_slots slots; None: top_k x max_batch, at most a layer's experts) instead of
    being copied in whole, as HOBBIT does: 2-4x fewer PCIe bytes for those experts, at their
    quantization error (serve/skip.py; off by default, exact). Needs full-precision experts
    (quant none).
    speculate: rows draft up to this many tokens a step by prompt lookup (the tokens that
    followed the latest earlier occurrence of their last 3), or with draft_model, and
    verify them in the same
    forward (serve/speculate.py): greedy rows keep the drafts that are the model's argmax,
    sampled rows draw by speculative sampling, each position judged on the logits as the
    row samples from them there (penalties, biases, grammar); the tokens (greedy) or their
    distribution (sampled) as a token a step gives, in fewer steps where the answer
    repeats its prompt (code edits, quotes, summaries). 0: off.
    draft_model: a small causal LM (a Hugging Face directory; transformers loads it whole on
    the device, inside the budget) sharing the model's tokenizer, which drafts a row's next
    `speculate` tokens greedily where prompt lookup finds nothing (serve/draft.py); None:
    prompt lookup only. draft_min_prob: a draft stops before a token the draft model gives
    less than this probability (transformers' assistant_confidence_threshold is 0.4 too):
    a draft the model likely rejects would still move its experts' bytes.
    prefix_cache: a prompt that begins with tokens a KV-cache row still holds (the chat so far,
    a shared system prompt) reads only the rest (serve.generate.DecodeBatch).
    cuda_graphs: once every expert is resident for good (the slots hold them all), each
    decode step (one new token a row) runs with fixed shapes, its attention over the keys up
    to the next power of two of its context (from 256) under a mask, replayed from a CUDA
    graph on cuda (serve/graphs.py): the host launches one graph a token instead of every
    kernel. On the CPU the same fixed-shape step runs eagerly. Off by default.
    trace_experts: a file the runtime writes the experts each forward pass ran from the
    device cache to (serve/trace.py), for `moe-serve plan --trace` to replay.
    """

    model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    memory_budget: str | int | None = None
    host_budget: str | int | None = None
    disk_readers: int | None = None
    cache_policy: str = "lru"
    prefetch: str = "cross-layer"
    prefetch_min_weight: float = 0.0
    prefetch_min_precision: float = MIN_PRECISION
    prefetch_fraction: float = 1.0
    quant: str = "auto"
    max_batch: int = 1
    max_context: int | None = None
    prefill_chunk: int = 512
    kernel_backend: str = "auto"
    offload_dir: str | None = None
    prefix_cache: bool = True
    prefill_step_tokens: int | None = None
    host_compute_tokens: int = 0
    skip_miss_weight: float = 0.0
    miss_quant: str = "none"
    miss_quant_weight: float = 0.0
    miss_quant_slots: int | None = None
    kv_cache_dtype: str = "auto"
    trace_experts: str | None = None
    speculate: int = 0
    draft_model: str | None = None
    draft_min_prob: float = 0.4
    cuda_graphs: bool = False

    def _check_miss_quant(self) -> None:
        if not 0 <= self.miss_quant_weight <= 1:
            raise ValueError(f"miss_quant_weight must be a weight in [0, 1], got "
                             f"{self.miss_quant_weight!r}")
        if (self.miss_quant == "none") != (self.miss_quant_weight == 0):
            raise ValueError("miss_quant and miss_quant_weight go together: a precision "
                             "(int8 or int4) for the missing experts lighter than a weight "
                             f"above 0; got miss_quant={self.miss_quant!r}, "
                             f"miss_quant_weight={self.miss_quant_weight!r}")
        if self.miss_quant != "none" and self.quant not in ("none", "auto", "fp8"):
            raise ValueError(f"miss_quant stands in for full-precision experts; with "
                             f"quant={self.quant!r} every expert is packed already")
        if self.miss_quant_slots is not None and self.miss_quant_slots < 1:
            raise ValueError(f"miss_quant_slots must be >= 1, got {self.miss_quant_slots}")

    def check(self) -> None:
        choices = {"device": ("auto", "cuda", "cpu"),
                   "dtype": ("auto", "float32", "bfloat16", "float16"),
                   "cache_policy": CACHE_POLICIES,
                   "prefetch": ("none", "cross-layer"), "quant": QUANT_CHOICES,
                   "miss_quant": MISS_QUANTS, "kv_cache_dtype": KV_CACHE_DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        for name, (what, types) in _FIELD_TYPES.items():
            value = getattr(self, name)
            # a bool is an int to isinstance: only fields that take one accept it
            if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if self.speculate < 0:
            raise ValueError(f"speculate must be >= 0, got {self.speculate}")
        if self.draft_model is not None and self.speculate < 1:
            raise ValueError("draft_model drafts tokens for speculation: speculate (the most "
                             f"tokens drafted a step) must be >= 1, got {self.speculate}")
        if not 0 <= self.skip_miss_weight <= 1:
            raise ValueError(f"skip_miss_weight must be a weight in [0, 1], got "
                             f"{self.skip_miss_weight!r}")
        self._check_miss_quant()
        if not 0 <= self.draft_min_prob <= 1:
            raise ValueError(f"draft_min_prob must be a probability in [0, 1], got "
                             f"{self.draft_min_prob!r}")
        if self.disk_readers is not None and self.disk_readers < 0:
            raise ValueError(f"disk_readers must be >= 0, got {self.disk_readers}")
        if self.host_compute_tokens < 0:
            raise ValueError(f"host_compute_tokens must be >= 0, got {self.host_compute_tokens}")
        if not 0 <= self.prefetch_min_precision <= 1:
            raise ValueError(f"prefetch_min_precision must be a number in [0, 1], got "
                             f"{self.prefetch_min_precision!r}")
        if not 0 < self.prefetch_fraction <= 1:
            raise ValueError(f"prefetch_fraction must be a number in (0, 1], got "
                             f"{self.prefetch_fraction!r}")
        if self.prefetch_min_weight < 0:
            raise ValueError(f"prefetch_min_weight must be a number >= 0, got "
                             f"{self.prefetch_min_weight!r}")
        for name in ("max_batch", "prefill_chunk", "prefill_step_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


SERVE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "serve"


def read_serve_config(name_or_path: str) -> dict:
    """A serving preset: a YAML file of ServeConfig fields, given as a path or as the name of
    one in configs/serve/ ("gpu_24gib" for configs/serve/gpu_24gib.yaml) -> {field: value}.
    ValueError names an unknown key or a value of the wrong type."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.exists() and not path.suffix:
        path = SERVE_CONFIGS / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in SERVE_CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"serve config {name_or_path!r} is neither a file nor one of "
                                f"configs/serve/: {', '.join(names)}")
    try:
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - YAML and interpolation errors alike
        raise ValueError(f"{path}: not a readable YAML config ({e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of ServeConfig fields")
    known = {f.name for f in fields(ServeConfig)}
    for key in doc:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r}; serve configs take "
                             f"{', '.join(sorted(known))}")
    try:  # the values as ServeConfig.check sees them (the model may come from a flag)
        ServeConfig(**{"model": "", **doc}).check()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return doc
