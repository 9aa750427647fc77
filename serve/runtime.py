"""The offloaded model: non-expert weights on the device, experts through the expert cache,
a KV cache, and the cross-layer prefetcher. `step` runs one forward over new tokens.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import reference, sort_by_expert, without_host_waits
from kernels.backend import get_backend
from moe.attention import additive_mask, causal_mask, rope_inv_freq, sink_mask
from moe.experts import expert_mlp
from moe.model import MoETransformer
from serve.cache import CacheStats, ExpertCache
from serve.config import ServeConfig
from serve.graphs import DecodeGraphs
from serve.kvcache import KVCache
from serve.prefetch_gate import PrefetchGate
from serve.skip import kept_pairs, light_missing, skip_missing
from serve.speculate import PREDICTED_DRAFT
from serve.store import QUANT_BITS, WeightStore, available_ram
from serve.units import format_size, parse_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BudgetError(ValueError):
    """The memory budget cannot hold what the runtime must keep on the device."""


@dataclass
class PrefetchStats:
    predicted: int = 0  # experts named by the predictor
    actual: int = 0  # experts the layers then used (for layers that had a prediction)
    correct: int = 0
    copied: int = 0  # layer predictions whose experts were copied ahead
    withheld: int = 0  # layer predictions scored but not copied (serve/prefetch_gate.py)

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else 0.0


def memory_plan(store: WeightStore, cfg: ServeConfig, dtype: torch.dtype, max_batch: int,
                max_context: int) -> tuple[int, int, str]:
    """(bytes kept on the device besides expert slots, bytes of one slot, a description):
    non-expert weights, KV cache and an estimate of the activations of one prefill chunk
    (with the residual streams of a whole prompt's other chunks), cuBLAS's workspace on
    CUDA, and the draft model with its KV caches when there is one."""
    m, el = store.cfg, torch.finfo(dtype).bits // 8
    device = resolve_device(cfg.device)
    dense = store.dense_nbytes()
    kv = KVCache.nbytes(m, max_batch, max_context, dtype, cfg.kv_cache_dtype)
    chunk = max_batch * min(cfg.prefill_chunk, max_context)
    k, Fe, d = m.moe.router.top_k, m.moe.expert_ffn, m.d_model
    if m.mla is not None:  # expanded q, its latent form, the cache entry
        lat = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
        hd_all = m.n_heads * (m.kv_dims[1] + lat) + lat
    else:  # q, k, v
        hd_all = (m.n_heads + 2 * m.n_kv_heads) * m.resolved_head_dim
    act = chunk * el * (4 * d + hd_all + k * (3 * Fe + d)) \
        + chunk * max_context * 4 * m.n_heads + max_batch * m.vocab_size * 4
    # a prompt read layer by layer (OffloadedModel.prefill) holds, for its other chunks, the
    # residual streams, the MoE's normed inputs (and their valid rows) and outputs, and the
    # attention masks (bool, one per window size: full and sliding at most)
    act += max_batch * max(0, max_context - chunk // max_batch) * (4 * d * el + 2 * max_context)
    # the drafted positions' logits and log-probabilities (float32): speculate's, or a
    # predicted answer's (a request may give one)
    act += 2 * max_batch * max(cfg.speculate, PREDICTED_DRAFT) * m.vocab_size * 4
    if m.attn_sinks:  # the float mask that carries the sinks
        act += chunk * (max_context + 1) * el * m.n_heads
    if store.bits is not None and get_backend(cfg.kernel_backend, device) is reference:
        # packed experts are dequantized one at a time
        act += 2 * Fe * d * (4 + el)
    parts = (f"non-expert weights {format_size(dense)}, KV cache {format_size(kv)} "
             f"({max_batch} x {max_context} tokens"
             + (", int8" if cfg.kv_cache_dtype == "int8" else "")
             + f"), activations ~{format_size(act)}")
    ws = 0
    if device.type == "cuda":  # torch's, allocated by the compute stream's first GEMM
        ws = cublas_workspace_bytes(device)
        parts += f", cuBLAS workspaces {format_size(ws)}"
    draft = 0
    if cfg.draft_model is not None:
        from serve.draft import draft_nbytes

        draft = draft_nbytes(cfg.draft_model, dtype, max_batch, max_context)
        parts += f", draft model {format_size(draft)} ({cfg.draft_model})"
    low = 0
    if cfg.miss_quant != "none" and store.moe_layers:  # the stand-ins' pool
        from kernels.quant import quantize

        probe = store.expert(store.moe_layers[0], 0).dense(dtype)
        bits = QUANT_BITS[cfg.miss_quant]
        n = miss_quant_slots(cfg, m, max_batch)
        low = n * (sum(quantize(w, bits).nbytes for w in (probe.w_in, probe.w_out))
                   + sum(b.nbytes for b in (probe.b_in, probe.b_out) if b is not None))
        parts += f", {n} {cfg.miss_quant} stand-in slots {format_size(low)}"
    return dense + kv + act + ws + draft + low, ExpertCache.slot_nbytes(store, dtype), parts


def miss_quant_slots(cfg: ServeConfig, m, max_batch: int) -> int:
    """Slots of the low-precision stand-ins' pool (ServeConfig.miss_quant_slots, else
    top_k x max_batch, at most a layer's experts)."""
    if cfg.miss_quant_slots is not None:
        return cfg.miss_quant_slots
    return min(m.moe.router.top_k * max_batch, m.moe.num_experts)


def context_of(cfg: ServeConfig, m) -> int:
    """KV-cache tokens a row reserves: cfg.max_context, else the model's context up to
    4096, never past the model's."""
    return min(cfg.max_context or min(m.max_seq_len, 4096), m.max_seq_len)


def plan_slots(store: WeightStore, cfg: ServeConfig, dtype: torch.dtype, max_batch: int,
               max_context: int, device: torch.device) -> tuple[int, int, int, str]:
    """(expert slots, fixed bytes, bytes a slot, the budget report) of cfg's budget (or
    FREE_SHARE of what device has free); BudgetError when not one slot fits."""
    fixed, slot, parts = memory_plan(store, cfg, dtype, max_batch, max_context)
    need = f"{parts} and one expert slot ({format_size(slot)}) need {format_size(fixed + slot)}"
    if cfg.memory_budget is None:  # what the device has free, less a margin
        free = free_memory(device)
        budget = int(free * FREE_SHARE)
        source = f"no budget given, {FREE_SHARE:.0%} of the {format_size(free)} free on {device}"
        short = (f"the model does not fit the {format_size(free)} free on {device}: "
                 f"{need} (with a {1 - FREE_SHARE:.0%} margin); lower --max-context / "
                 "--max-batch, or free memory on the device")
    else:
        budget = parse_size(cfg.memory_budget)
        source = f"budget {format_size(budget)}"
        short = (f"memory budget {format_size(budget)} is too small: {need}; raise "
                 "--memory-budget or lower --max-context / --max-batch")
    n = (budget - fixed) // slot
    if n < 1:
        raise BudgetError(short)
    total = store.total_experts
    n = min(n, max(total, 1))
    return n, fixed, slot, (f"{source}: {n}/{total} expert slots ({format_size(n * slot)}); "
                            f"{parts}")


# The attention backends the runtime lets SDPA choose from: not cuDNN's, which builds an
# execution plan for each new shape, and a decode step's key count is new at every step (on
# the lent H200, bench/RESULTS.md 2026-11-30: about 17 ms of host time a call, a setting's
# first run paying 35 ms a token of them). A pass (prefill) runs its layers under it.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]

# the fewest keys a fixed-shape decode step reads (--cuda-graphs): a step of a context of
# n reads the next power of two from here, under a mask
FIXED_MIN_KEYS = 256

# with no budget given, the runtime takes this share of the device's free memory
FREE_SHARE = 0.9


def cublas_workspace_bytes(device: torch.device, config: str | None = None) -> int:
    """Bytes of the cuBLAS and cuBLASLt workspaces torch allocates through its caching
    allocator for a stream's GEMMs (so they count against the budget): the sum of size KiB x
    count over CUBLAS_WORKSPACE_CONFIG's ":SIZE:COUNT" pairs (config, else the
    environment's), else torch's default, 32 MiB from compute capability 9 (Hopper) on,
    8 MiB + 128 KiB before; and cuBLASLt's CUBLASLT_WORKSPACE_SIZE KiB (1 MiB by default),
    which torch versions that share one workspace between the two do not add (counted
    anyway: at most 1 MiB over)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG") if config is None else config
    pairs = re.findall(r":(\d+):(\d+)", config or "")
    if pairs:
        cublas = sum(int(size) * int(count) for size, count in pairs) * 1024
    else:
        major = torch.cuda.get_device_properties(device).major
        cublas = (4096 * 8 if major >= 9 else 4096 * 2 + 16 * 8) * 1024
    lt = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "1024")
    return cublas + (int(lt) if lt.isdigit() else 1024) * 1024


def free_memory(device: torch.device) -> int:
    """Bytes free on device: CUDA's free memory, or the RAM the system can give (cpu)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; "
                         "use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A ServeConfig dtype on device: "auto" is bfloat16 on cuda, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass
class _Chunk:
    """One step's tokens (OffloadedModel._context): B rows of S positions (count valid each),
    their positions, RoPE, the cache rows and positions they write (w_rows, w_pos: one per
    valid token), the keys they read (n_keys), and their attention masks by window."""

    B: int
    S: int
    end: int
    last: torch.Tensor  # [B] each row's last real position (0 for a row of none)
    q_pos: torch.Tensor
    real: torch.Tensor  # [B, S] int64, 1 at a real position (q_valid as a bool)
    cos: torch.Tensor
    sin: torch.Tensor
    b_idx: torch.Tensor
    s_at: torch.Tensor
    kv_rows: torch.Tensor
    w_rows: torch.Tensor
    w_pos: torch.Tensor
    n_keys: int
    r0: int
    dense: bool  # the rows are consecutive: the cache is read as a view, not gathered
    full: bool  # every row has S new tokens (no padding)
    sees_all: bool  # one new token a row, each row's keys up to `end`: every key is visible
    masks: dict

    @cached_property
    def q_valid(self) -> torch.Tensor:
        """[B, S] bool: the real positions."""
        return self.real.bool()

    @property
    def valid(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The real positions as (row, position) index tensors; None when every position is
        real (rows of S new tokens each: the [B * S, d] rows are a view, not a gather)."""
        return None if self.full else (self.b_idx, self.s_at)

    def written(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of the real positions of t [B, H, S, dim] -> [P, H, dim] (one token
        a row, none padding: a view)."""
        if self.full and self.S == 1:
            return t[:, :, 0]
        return t.transpose(1, 2)[self.b_idx, self.s_at]

    def bias_for(self, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """mask_for as the additive mask (0 / -inf) SDPA would make of it at every call:
        made once a step."""
        mask = self.mask_for(window)
        if mask is None:
            return None
        key = ("bias", window)
        if key not in self.masks:
            self.masks[key] = additive_mask(mask, dtype)
        return self.masks[key]

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """[B, 1, S, end]: a query sees its row's keys up to its own position (the last
        `window` of them with a sliding window); a padding query sees key 0. None where
        every query sees every key (a decode step of rows of one length: no mask to build,
        and attention runs unmasked)."""
        if self.sees_all and (window is None or window >= self.end):
            return None
        if window not in self.masks:
            m = causal_mask(self.q_pos, self.end, window)
            m[:, :, 0] |= ~self.q_valid
            self.masks[window] = m[:, None]
        return self.masks[window]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """SDPA of q [B, H, S, dk] over k [B, Hkv, N, dk], v [B, Hkv, N, dv] (H a multiple of
    Hkv) under mask (None, or additive [B | 1, 1 | H, S, N]) -> [B, H, S, dv]. With one query
    a row and a mask, each KV head's query heads go as its rows (q [B, Hkv, H / Hkv, dk]):
    SDPA's kernels that take a mask then read K and V as they are, where enable_gqa would
    have them copied for every query head (the math kernel)."""
    B, H, S, dk = q.shape
    Hkv = k.shape[1]
    if S != 1 or mask is None or H == Hkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=H != Hkv)
    G = H // Hkv
    if mask.shape[1] != 1:  # per-head (attention sinks): each KV head's query heads
        mask = mask.reshape(mask.shape[0], Hkv, G, mask.shape[-1])
    o = F.scaled_dot_product_attention(q.reshape(B, Hkv, G, dk), k, v, attn_mask=mask,
                                       scale=scale)
    return o.reshape(B, H, 1, o.shape[-1])


def experts_named(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Expert ids (any shape) -> [E] bool on their device: the experts they name (two
    launches; nothing read back)."""
    return torch.zeros(E, dtype=torch.bool, device=ids.device).index_fill_(0, ids.reshape(-1),
                                                                           True)


def _take(t: torch.Tensor, v) -> torch.Tensor:
    """The real positions v (_Chunk.valid) of t [B, S, d] -> [n, d]."""
    return t.reshape(-1, t.shape[-1]) if v is None else t[v]


def _rows(xs: list[torch.Tensor], valid: list) -> torch.Tensor:
    """The real positions of several chunks' xs, one after another -> [n, d]."""
    rows = [_take(x, v) for x, v in zip(xs, valid, strict=True)]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _add(outs: list[torch.Tensor | None], c: int, y: torch.Tensor) -> None:
    """outs[c] += y, where None is zero (the first sum kept as it is: no zeros to add to;
    every y is a fresh tensor of its own)."""
    outs[c] = y if outs[c] is None else outs[c].add_(y)


class OffloadedModel:
    """A served model. `step` runs a forward over new tokens of sequences that each own one
    row of the KV cache; rows are independent, so sequences may start and end at different
    times (serve.generate.DecodeBatch schedules them)."""

    def __init__(self, cfg: ServeConfig, verbose: bool = False,
                 store: WeightStore | None = None):
        """store: an already opened WeightStore of cfg.model (benchmarks reuse one)."""
        cfg.check()
        self.scfg = cfg
        self.device = resolve_device(cfg.device)
        on_cuda = self.device.type == "cuda"
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        host_budget = None if cfg.host_budget is None else parse_size(cfg.host_budget)
        if host_budget is None and not on_cuda:
            host_budget = 0  # cpu: the memory-mapped files are the offload tier
        self.store = store or WeightStore(cfg.model, self.dtype, cfg.quant, host_budget,
                                          pin=on_cuda, offload_dir=cfg.offload_dir,
                                          verbose=verbose)
        mcfg = self.store.cfg
        if cfg.miss_quant != "none" and self.store.quant not in ("none", "fp8"):
            raise ValueError(f"miss_quant stands in for full-precision experts; this model's "
                             f"experts are {self.store.quant} already")
        mcfg.moe.kernel_backend = cfg.kernel_backend
        mcfg.moe.router.validate = False
        self.cfg = mcfg
        self.max_context = context_of(cfg, mcfg)
        self.max_batch = cfg.max_batch
        self.n_slots, self.budget_report = self._plan_memory(cfg)
        self.model = self._build_model()
        self.kv = KVCache(mcfg, self.max_batch, self.max_context, self.dtype, self.device,
                          cfg.kv_cache_dtype)
        self.sinks = mcfg.attn_sinks
        # RoPE's frequencies (float64, on the host: each step's cos / sin are built there)
        self._rope = rope_inv_freq(mcfg.rope_dim, mcfg.rope_theta, mcfg.rope_scaling)
        self.prefetch = cfg.prefetch == "cross-layer"
        side = torch.cuda.Stream(self.device) if on_cuda and self.prefetch else None
        readers = cfg.disk_readers if cfg.disk_readers is not None else 4 * on_cuda
        self.cache = ExpertCache(self.store, self.n_slots, cfg.cache_policy, self.device,
                                 self.dtype, side, readers)
        self.trace = None  # the expert-access trace (serve/trace.py), if asked for
        if cfg.trace_experts:
            from serve.trace import ExpertTrace

            self.trace = ExpertTrace(cfg.trace_experts, self.store.moe_layers,
                                     mcfg.moe.num_experts, mcfg.moe.router.top_k)
        self.low_cache = None  # the low-precision stand-ins of light missing experts
        if cfg.miss_quant != "none":
            low = WeightStore(cfg.model, self.dtype, cfg.miss_quant, host_budget, pin=on_cuda,
                              offload_dir=cfg.offload_dir, verbose=verbose)
            self.low_cache = ExpertCache(low, miss_quant_slots(cfg, mcfg, self.max_batch),
                                         "lru", self.device, self.dtype, None, readers)
        self.prefetch_stats = PrefetchStats()
        self._before_reset: dict[str, int] = {}  # counts up to the last reset_stats
        # fixed-shape decode steps (CUDA graphs on cuda) once every expert is resident: each
        # MoE layer's expert -> slot table on the device, and the hits its steps counted there
        self.graphs = (DecodeGraphs(self.device, self._fixed_step, self._fixed_forward)
                       if cfg.cuda_graphs else None)
        self._tables: dict[int, torch.Tensor] | None = None
        self._hits = torch.zeros((), dtype=torch.int64, device=self.device)
        # its copy on the host after each fixed step (what counters() reads, from any thread:
        # no device read, no write), and its value at the last reset_stats
        self._hits_host = torch.zeros((), dtype=torch.int64, pin_memory=on_cuda)
        self._hits_base = 0
        # layer -> its predicted experts: a set (copied), or a [E] bool mask on the device
        # (withheld by the gate: scored when the layer runs, no host wait before)
        self._predicted: dict[int, set[int] | torch.Tensor] = {}
        self.gate = PrefetchGate(cfg.prefetch_min_precision)
        self.drafter = None  # the draft model of speculation, if any (serve/draft.py)
        if cfg.draft_model is not None:
            from serve.draft import Drafter

            self.drafter = Drafter(cfg.draft_model, cfg.model, mcfg.vocab_size, self.device,
                                   self.dtype, self.max_batch, cfg.draft_min_prob)
        layers = self.store.moe_layers
        # layer i -> the MoE layer whose experts it predicts: each MoE layer the next one, and
        # a dense layer right before the first MoE layer (DeepSeek's, GLM's) that first one
        self.next_moe = dict(zip(layers, layers[1:], strict=False))
        if layers and layers[0] > 0:
            self.next_moe[layers[0] - 1] = layers[0]
        self.verbose = verbose
        if verbose:
            print(f"moe-serve: {self.store.describe()}; {self.budget_report}", file=sys.stderr)

    # -- set-up ----------------------------------------------------------------------------
    def _plan_memory(self, cfg: ServeConfig) -> tuple[int, str]:
        n, self.fixed_bytes, self.slot_bytes, report = plan_slots(
            self.store, cfg, self.dtype, self.max_batch, self.max_context, self.device)
        return n, report

    def _build_model(self) -> MoETransformer:
        with torch.device("meta"):
            model = MoETransformer(self.cfg)
        for block in model.layers:
            if block.is_moe:
                block.mlp.experts = nn.Identity()  # experts come from the cache
        state = self.store.dense_state()
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [n for n in missing if not (self.cfg.tie_embeddings and n == "lm_head.weight")
                   and not n.endswith("expert_bias")]
        if missing or unexpected:
            raise RuntimeError(f"weights do not match the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        if self.cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        for mod in model.modules():  # buffers created on meta (none expected besides biases)
            for name, buf in list(mod.named_buffers(recurse=False)):
                if buf.is_meta:
                    mod.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype))
        for block in model.layers:  # one q / k / v GEMM a layer (MLA projects otherwise)
            if hasattr(block.attn, "fuse_qkv"):
                block.attn.fuse_qkv(self.device)
        return model.to(self.device).eval()

    # -- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, ids: torch.Tensor, rows: Sequence[int], start: Sequence[int],
             n: Sequence[int], targets: torch.Tensor | None = None, top: int = 0):
        """ids [B, S]: the first n[b] tokens of row b (the rest is right padding) go at
        positions start[b].. of KV-cache row rows[b], which holds positions [0, start[b]) of
        the same sequence -> logits [B, V] (float32) of each row's last token.
        targets [B, S] (token ids, -1: none): also return the log-probability of targets[b, s]
        after position s, and of the `top` likeliest tokens there -> (logits, log-probs [B, S]
        (NaN where there is no target), top ids [B, S, top], top log-probs [B, S, top])."""
        return self.prefill([(ids, rows, start, n, targets)], top)[0]

    @torch.no_grad()
    def prefill(self, chunks: Sequence[tuple], top: int = 0,
                copies: dict[int, list[tuple[int, int, int]]] | None = None,
                keep: Sequence[int] = ()) -> list:
        """Several `step`s, (ids, rows, start, n, targets) each, run layer by layer: every
        chunk passes layer i's attention (each chunk's keys and values are written before
        the next chunk's queries read them), then layer i's MoE runs for all their tokens at
        once, a group of experts that fits the slots at a time, each group over every chunk
        in turn. So a long prompt read in chunks moves each expert of a layer to the device
        once, not once per chunk, and activations stay those of one chunk (besides the
        chunks' residual streams, held at once) -> one step result per chunk.
        copies {chunk k: [(src row, dst row, n)]}: in each layer, just before chunk k's
        attention, row dst takes row src's keys and values of positions [0, n) (written by
        earlier chunks of this pass: a start shared by prompts read together is read once).
        keep: chunks (with targets) whose result also holds the logits of every scored
        position: a fifth item, per row a [positions, V] float32 tensor (or None)."""
        if self._fixed_ok(chunks, top, copies, keep):
            ids, rows, start, *_ = chunks[0]
            return [self._fixed_run(ids, rows, start)]
        ctxs = [self._context(ids, rows, start, n) for ids, rows, start, n, _ in chunks]
        if self.trace is not None:
            self.trace.begin(sum(sum(c[3]) for c in chunks), sum(len(c[1]) for c in chunks))
        xs = [self.model.embed(ids) for ids, *_ in chunks]
        copies = copies or {}
        with sdpa_kernel(ATTENTION_BACKENDS):  # once a pass (~25 us a call on a CPU)
            for i in range(len(self.model.layers)):
                for k, ctx in enumerate(ctxs):
                    for src, dst, n in copies.get(k, ()):
                        self.kv.copy_entries(src, dst, n, layer=i)
                    xs[k] = self._attend(i, xs[k], ctx)
                xs = self._mlp(i, xs, [ctx.valid for ctx in ctxs])
        if self.trace is not None:
            self.trace.end()
        return [self._head(x, ctx, t, top, k in keep)
                for k, (x, ctx, (*_, t)) in enumerate(zip(xs, ctxs, chunks, strict=True))]

    def _context(self, ids: torch.Tensor, rows: Sequence[int], start: Sequence[int],
                 n: Sequence[int]) -> _Chunk:
        """Positions, RoPE, masks and cache indices of one step's tokens (see step)."""
        dev = self.device
        B, S = ids.shape
        end = max(a + c for a, c in zip(start, n, strict=True))
        if end > self.max_context:
            raise ValueError(f"{end} tokens exceed the context of {self.max_context}")
        for r, a in zip(rows, start, strict=True):
            self.kv.forget(r, a)  # the caller records the tokens once they are written
        # every index is known here: built on the host, it goes over in one copy (pinned on
        # CUDA: waiting for nothing) instead of a dozen small ops and copies on the device
        q_pos = [a + s for a in start for s in range(S)]
        b_idx = [b for b, c in enumerate(n) for _ in range(c)]
        s_at = [s for c in n for s in range(c)]
        off, P = self.kv.offset, len(b_idx)
        w_pos = [start[b] + s + off for b, s in zip(b_idx, s_at, strict=True)]
        parts = (q_pos, [int(s < c) for c in n for s in range(S)], b_idx, s_at, list(rows),
                 [rows[b] for b in b_idx], w_pos, [max(c - 1, 0) for c in n])
        pinned = dev.type == "cuda"
        packed = torch.tensor([v for p in parts for v in p], pin_memory=pinned).to(
            dev, non_blocking=True)
        q_pos_t, real, b_t, s_t, kv_rows, w_rows, w_pos, last = packed.split(
            [B * S, B * S, P, P, B, P, P, B])
        cs = self._rope_rows(q_pos)  # [2, B * S, r] on the host, then one copy
        cos, sin = (cs.pin_memory() if pinned else cs).to(dev, non_blocking=True).unbind(0)
        r0 = rows[0]
        sees_all = S == 1 and not self.sinks and all(
            c == 1 and a + 1 == end for a, c in zip(start, n, strict=True))
        return _Chunk(B, S, end, last, q_pos_t.view(B, S), real.view(B, S),
                      cos.view(B, S, -1), sin.view(B, S, -1), b_t, s_t, kv_rows, w_rows, w_pos,
                      end + off, r0, list(rows) == list(range(r0, r0 + B)),
                      all(c == S for c in n), sees_all, {})

    def _rope_rows(self, q_pos: list[int]) -> torch.Tensor:
        """Positions q_pos -> their RoPE cos and sin [2, len(q_pos), r] in dtype, on the host."""
        inv_freq, attn = self._rope
        freqs = torch.tensor(q_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return torch.stack([emb.cos() * attn, emb.sin() * attn]).to(self.dtype)

    # -- fixed-shape decode steps (serve/graphs.py) ----------------------------------------
    def _fixed_ok(self, chunks, top: int, copies, keep) -> bool:
        """Whether this pass runs as a fixed-shape step: asked for (cuda_graphs), a decode
        step (one chunk of one new token a row, nothing scored, no KV copies) and slots for
        every expert: the first such step makes them all resident, for good (none is
        evicted again)."""
        if self.graphs is None or len(chunks) != 1 or top or copies or keep:
            return False
        ids, rows, start, n, targets = chunks[0]
        if targets is not None or ids.shape[1] != 1 or any(c != 1 for c in n):
            return False
        if self._tables is None:
            c, E = self.cache, self.cfg.moe.num_experts
            if self.trace is not None or c.n_slots < self.store.total_experts:
                return False
            if self.verbose:
                print(f"moe-serve: loading all {self.store.total_experts} experts "
                      f"({format_size(self.store.total_experts * self.slot_bytes)}) to the "
                      "device for fixed-shape decode steps (--cuda-graphs)", file=sys.stderr,
                      flush=True)
            c.fill([(i, e) for i in self.store.moe_layers for e in range(E)])  # all, once
            self._tables = {  # [E]: the slot of each expert, for good
                i: torch.tensor([c.slot_of[(i, e)] for e in range(E)], device=self.device)
                for i in self.store.moe_layers}
        return True

    def _fixed_step(self, key: tuple[tuple[int, ...], int]
                    ) -> tuple[_Chunk, torch.Tensor, torch.Tensor]:
        """The fixed buffers of a decode step of KV-cache rows `rows`, one token each, whose
        queries see their row's keys among the first N positions under a mask (key: (rows,
        N)) -> (its _Chunk, ints [3, B] (tokens, positions, cache positions), cs [2, B, 1, r]
        (RoPE cos, sin)); _fixed_run fills ints and cs each step."""
        (rows, N), dev = key, self.device
        B = len(rows)
        ints = torch.zeros(3, B, dtype=torch.long, device=dev)
        r = 2 * self._rope[0].numel()  # _rope_rows' width
        cs = torch.zeros(2, B, 1, r, dtype=self.dtype, device=dev)
        kv_rows = torch.tensor(rows, device=dev)
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        dense = list(rows) == list(range(rows[0], rows[0] + B))
        return _Chunk(B, 1, N, zeros, ints[1].view(B, 1),
                      torch.ones(B, 1, dtype=torch.long, device=dev), cs[0], cs[1],
                      torch.arange(B, device=dev), zeros, kv_rows, kv_rows, ints[2],
                      N + self.kv.offset, rows[0], dense, True, False, {}), ints, cs

    def _fixed_run(self, ids: torch.Tensor, rows: Sequence[int], start: Sequence[int]
                   ) -> torch.Tensor:
        """A decode step as a fixed-shape step (see step) -> logits [B, V] float32."""
        end = max(start) + 1
        if end > self.max_context:
            raise ValueError(f"{end} tokens exceed the context of {self.max_context}")
        for r, a in zip(rows, start, strict=True):
            self.kv.forget(r, a)  # the caller records the tokens once they are written
        order = sorted(range(len(rows)), key=rows.__getitem__)  # one graph per set of rows
        back = None
        if order != list(range(len(rows))):
            rows, start = [rows[j] for j in order], [start[j] for j in order]
            order_t = torch.tensor(order, device=self.device)
            ids, back = ids[order_t], torch.empty_like(order_t).scatter_(
                0, order_t, torch.arange(len(order), device=self.device))
        # the keys a step reads: a power of two from FIXED_MIN_KEYS on (a graph per length
        # a row's context doubles through), not the whole context each token
        n = min(self.max_context, max(FIXED_MIN_KEYS, 1 << (end - 1).bit_length()))
        key = (tuple(rows), n)
        _, ints, cs = self.graphs.fixed(key)
        pinned = self.device.type == "cuda"
        ints[0].copy_(ids[:, 0], non_blocking=True)  # on the device already: not read back
        packed = torch.tensor([list(start), [a + self.kv.offset for a in start]],
                              pin_memory=pinned)
        ints[1:].copy_(packed, non_blocking=True)
        rope = self._rope_rows(list(start)).unsqueeze(2)  # [2, B, 1, r]
        cs.copy_(rope.pin_memory() if pinned else rope, non_blocking=True)

        def before_capture():  # the warm-ups count hits that the real step counts again
            hits = self._hits.clone()
            return lambda: self._hits.copy_(hits)

        logits = self.graphs.run(key, before_capture)
        self._hits_host.copy_(self._hits, non_blocking=True)  # there by the sample's read
        return logits if back is None else logits[back]

    def _fixed_forward(self, fixed: tuple[_Chunk, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The forward of a fixed step (_fixed_step's), its buffers filled -> logits [B, V]
        float32. Waits for nothing (what a CUDA graph can hold)."""
        c, ints, _ = fixed
        c.masks = {}  # masks of this step's positions, made anew
        x = self.model.embed(ints[0].view(c.B, 1))
        with sdpa_kernel(ATTENTION_BACKENDS):
            for i, block in enumerate(self.model.layers):
                x = self._attend(i, x, c)
                h = block.mlp_norm(x)
                x = x + (self._moe_resident(i, h) if block.is_moe else block.mlp(h))
        return self._head(x, c, None, 0)

    def _moe_resident(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """MoE layer i over h [B, S, d] (every position real), every expert resident: its
        pairs through the slot table; the distinct experts used count as hits, on the device
        (read with the stats) -> [B, S, d]."""
        layer, E = self.model.layers[i].mlp, self.cfg.moe.num_experts
        flat = h.reshape(-1, h.shape[-1])
        ids, w = layer.router.select(flat)
        self._hits.add_(experts_named(ids, E).sum())
        out = self._run_experts(flat, self._tables[i][ids], w, self.cache, True)
        if layer.shared is not None:
            out = out + layer.shared(flat)
        return out.view_as(h)

    def _attend(self, i: int, x: torch.Tensor, ctx: _Chunk) -> torch.Tensor:
        """Layer i's attention over one step's residual stream x [B, S, d], writing the
        step's keys and values to the cache -> x."""
        block = self.model.layers[i]
        attn, mla, c, kv = block.attn, self.cfg.mla is not None, ctx, self.kv
        if mla:  # queries in latent space against the cached latents
            q, k = attn.project_latent(block.attn_norm(x), c.cos, c.sin)
        else:
            q, k, v = attn.project(block.attn_norm(x), c.cos, c.sin)
            kv.put(i, "v", c.w_rows, c.w_pos, c.written(v))
        kv.put(i, "k", c.w_rows, c.w_pos, c.written(k))
        r0, B = c.r0, c.B
        rows = slice(r0, r0 + B) if c.dense else c.kv_rows
        keys = kv.get(i, "k", rows, c.n_keys)  # [B, Hkv, keys, hd]
        values = keys[..., :attn.kv_rank] if mla else kv.get(i, "v", rows, c.n_keys)
        mask = c.bias_for(block.window, self.dtype)
        if self.sinks:  # GPT-OSS: cache position 0 is a zero key / value, the sink's
            mask = sink_mask(mask, attn.sinks, self.dtype)
        o = decode_attention(q, keys, values, mask, attn.scale)
        return x + (attn.latent_out(o) if mla
                    else attn.o_proj(o.transpose(1, 2).reshape(B, c.S, -1)))

    def _mlp(self, i: int, xs: list[torch.Tensor], valid: list) -> list[torch.Tensor]:
        """Layer i's MLP over the residual streams xs ([B, S, d] each; valid: their real
        positions, as (row, position) index tensors: gathering by them waits for nothing,
        where a boolean mask's nonzero would wait for the device; None: all of them, see
        _Chunk.valid) of one or more chunks ->
        xs; for the next MoE layer it predicts and starts copying experts from all of
        them."""
        block = self.model.layers[i]
        hs = [block.mlp_norm(x) for x in xs]
        prefetch = self.prefetch and i in self.next_moe
        if block.is_moe:
            return [x + y for x, y in zip(xs, self._moe(i, hs, xs, valid, prefetch),
                                          strict=True)]
        if prefetch:  # copies overlap the dense MLP
            self._prefetch_next(i, _rows(xs, valid), set())
        return [x + block.mlp(h) for x, h in zip(xs, hs, strict=True)]

    def _head(self, x: torch.Tensor, ctx: _Chunk, targets: torch.Tensor | None, top: int,
              keep: bool = False):
        """The step's result from its final residual stream x [B, S, d] (see step; keep:
        with the scored positions' logits, see prefill)."""
        model, dev, B = self.model, self.device, ctx.B
        last = x[:, -1] if ctx.full else x[torch.arange(B, device=dev), ctx.last]
        logits = model.lm_head(model.norm(last)).float()
        if targets is None:
            return logits
        t = targets.to(dev)
        lp = torch.full(t.shape, float("nan"), device=dev)
        top_ids = torch.zeros(*t.shape, top, dtype=torch.long, device=dev)
        top_lp = torch.full((*t.shape, top), float("nan"), device=dev)
        kept: list[torch.Tensor | None] = [None] * B
        for b in range(B):  # one row's positions at a time: [S, V] logits, not [B, S, V]
            has = (t[b] >= 0) & ctx.q_valid[b]
            if has.any():
                raw = model.lm_head(model.norm(x[b][has])).float()
                row = raw.log_softmax(-1)
                lp[b, has] = row.gather(1, t[b][has, None])[:, 0]
                if top:
                    best = row.topk(top, dim=-1)
                    top_ids[b, has], top_lp[b, has] = best.indices, best.values
                if keep:
                    kept[b] = raw
        return (logits, lp, top_ids, top_lp) + ((kept,) if keep else ())

    def synchronize(self) -> None:
        """Wait for the device (timings); nothing to wait for on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _moe(self, i: int, hs: list[torch.Tensor], xs: list[torch.Tensor],
             valid: list, prefetch: bool) -> list[torch.Tensor]:
        """hs [B, S, d] (normed) of one or more chunks -> their MoE outputs (zeros at padded
        positions). The experts any chunk needs are made resident a group of slots at a
        time (hits first), each group serving every chunk before the next is fetched;
        prefetch: the next MoE layer's experts are predicted before any copy is queued (one
        host wait for both layers' expert lists) and copied ahead with the last group. A
        missing expert that few of the step's tokens use (scfg.
        host_compute_tokens) runs on the host CPU instead, while the device runs the rest;
        one that only pairs of low weight use (scfg.skip_miss_weight) is skipped, or
        (scfg.miss_quant_weight) runs from its low-precision copy in a pool of its own
        (serve/skip.py)."""
        layer = self.model.layers[i].mlp
        flats = [_take(h, v) for h, v in zip(hs, valid, strict=True)]
        routes = [layer.router.select(f) for f in flats]
        all_ids = torch.cat([ids.reshape(-1) for ids, _ in routes]) if len(routes) > 1 \
            else routes[0][0].reshape(-1)
        E = self.cfg.moe.num_experts
        used = experts_named(all_ids, E)
        j = pred = None
        # one read from the device (the host's one wait this layer): the experts used, the
        # next layer's prediction when it is copied, this layer's withheld prediction
        reads = [used]
        if prefetch:  # the prediction from this layer's input, waited for with the routing
            j, named = self._predict(i, _rows(xs, valid))
            if self.gate.allow(j):
                reads.append(named)
        withheld = self._predicted.get(i)
        if isinstance(withheld, torch.Tensor):
            reads.append(withheld)
        got = torch.stack(reads).tolist() if len(reads) > 1 else [used.tolist()]
        if isinstance(withheld, torch.Tensor):
            mask = got.pop()
            self._predicted[i] = {e for e in range(E) if mask[e]}
        if len(got) > 1:
            pred = [e for e in range(E) if got[1][e]]
        needed = [e for e, u in enumerate(got[0]) if u]
        every = set(needed)  # the experts the layer's pairs name
        self._account(i, needed)
        if prefetch:
            self._predicted[j] = named if pred is None else set(pred)
            if pred is None:
                self.prefetch_stats.withheld += 1
        cache = self.cache
        missing = [e for e in needed if not cache.resident((i, e))]
        if self.scfg.skip_miss_weight > 0:
            routes, skipped = skip_missing(routes, missing, self.scfg.skip_miss_weight,
                                           self.cfg.moe.num_experts)
            needed = [e for e in needed if e not in skipped]
            missing = [e for e in missing if e not in skipped]
            cache.stats.skipped += len(skipped)
        low = set()
        if self.low_cache is not None:
            low = light_missing(routes, missing, self.scfg.miss_quant_weight,
                                self.cfg.moe.num_experts)
            needed = [e for e in needed if e not in low]
            missing = [e for e in missing if e not in low]
        host = self._host_set(all_ids, missing)
        if host:  # their tokens go to the host before the device work is queued behind them
            taken = [self._host_inputs(flat, ids, w, host)
                     for flat, (ids, w) in zip(flats, routes, strict=True)]
            needed = [e for e in needed if e not in host]
        needed.sort(key=lambda e: not cache.resident((i, e)))  # hits first
        outs: list[torch.Tensor | None] = [None] * len(flats)  # (the first sum is kept)
        ahead = (lambda keys: self._copy_ahead(j, pred, keys)) if pred is not None else None
        if not self._in_groups(i, needed, cache, outs, flats, routes, ahead, every) and ahead:
            ahead(set())  # every expert ran on the host or stood in
        if low:  # from their low-precision copies
            self._in_groups(i, sorted(low), self.low_cache, outs, flats, routes)
        if host:  # the host computes while the device runs the groups queued above
            for c, t in enumerate(taken):
                _add(outs, c, self._host_experts(i, *t).to(self.device, non_blocking=True))
            cache.stats.on_host += len(host)
        ys = []
        for c, (h, v, flat) in enumerate(zip(hs, valid, flats, strict=True)):
            if layer.shared is not None:
                _add(outs, c, layer.shared(flat))
            out = torch.zeros_like(flat) if outs[c] is None else outs[c]
            if v is None:  # every position is real
                ys.append(out.view_as(h))
                continue
            y = torch.zeros_like(h)
            y[v] = out
            ys.append(y)
        return ys

    def _in_groups(self, i: int, experts: list[int], cache: ExpertCache,
                   outs: list[torch.Tensor | None], flats: list[torch.Tensor], routes: list,
                   before_last=None, every: set[int] | None = None) -> int:
        """Add to each chunk's output (outs, beside flats and routes; see _add) the pairs of
        layer i's experts, made resident in cache a group of its slots at a time, each group
        serving every chunk before the next is fetched; before_last(keys) runs once the last
        group is resident; every: the experts the pairs name (when one group holds them all,
        no pair is left out) -> the number of groups."""
        if self.trace is not None and cache is self.cache:
            self.trace.add(i, experts)
        n = cache.n_slots
        groups = [experts[a:a + n] for a in range(0, len(experts), n)]
        whole = len(groups) == 1 and every is not None and set(experts) == every
        for g, group in enumerate(groups):
            keys = [(i, e) for e in group]
            got = cache.acquire(keys)
            slots = {e: got[k] for e, k in zip(group, keys, strict=True)}
            if g == len(groups) - 1 and before_last is not None:
                before_last(set(keys))
            for c, (flat, (ids, w)) in enumerate(zip(flats, routes, strict=True)):
                _add(outs, c, self._experts(flat, ids, w, slots, cache, whole))
        return len(groups)

    def _host_set(self, all_ids: torch.Tensor, missing: list[int]) -> set[int]:
        """The experts of a layer to run on the host (of `missing`, those it needs that are
        not resident; all_ids: its (token, k) pairs' experts): those that at most
        scfg.host_compute_tokens pairs use, but for as many as empty slots take without
        evicting (the most used first)."""
        most = self.scfg.host_compute_tokens
        if not most:
            return set()
        counts = torch.bincount(all_ids, minlength=self.cfg.moe.num_experts).tolist()
        few = sorted((e for e in missing if counts[e] <= most), key=lambda e: -counts[e])
        empty = max(0, self.cache.empty - (len(missing) - len(few)))  # the others take first
        return set(few[empty:])

    @staticmethod
    def _host_inputs(flat: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, host: set[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The pairs of one chunk (flat [T, d], ids / w [T, k]) whose expert is in host, on
        the host -> (their tokens' rows [P, d], token index [P], expert [P], weight [P], T)."""
        sel = torch.isin(ids, torch.tensor(sorted(host), device=ids.device))
        tok, kk = sel.nonzero(as_tuple=True)
        return (flat[tok].cpu(), tok.cpu(), ids[tok, kk].cpu(), w[tok, kk].cpu(),
                flat.shape[0])

    def _host_experts(self, i: int, x: torch.Tensor, tok: torch.Tensor, expert: torch.Tensor,
                      w: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Layer i's experts run on the host CPU from their host copies (RAM or the memory-
        mapped files; nothing crosses to the device but the outputs) for the pairs
        _host_inputs took -> the weighted sum per token [n_tokens, d], on the host."""
        # pinned on CUDA, so that its copy to the device waits for nothing (see _experts)
        out = torch.zeros(n_tokens, x.shape[1], dtype=x.dtype,
                          pin_memory=self.device.type == "cuda")
        m = self.cfg.moe
        for e in expert.unique().tolist():
            at = (expert == e).nonzero()[:, 0]
            src = self.store.expert(i, e).dense(self.dtype)
            d = sort_by_expert(torch.zeros(len(at), 1, dtype=torch.long), 1)
            y = expert_mlp(x[at], src.w_in[None], src.w_out[None], d,  # a stack of one
                           m.expert_type, "torch", True, *(None if b is None else b[None]
                                                           for b in (src.b_in, src.b_out)),
                           m.swiglu_alpha, m.swiglu_limit)
            out.index_add_(0, tok[at], y * w[at, None].to(y.dtype))
        return out

    def _account(self, i: int, needed) -> None:
        """Prefetch precision / recall: layer i used the experts `needed`."""
        pred = self._predicted.pop(i, None)  # a set by now (_moe reads a mask with the routing)
        if pred is not None:
            st = self.prefetch_stats
            correct = len(pred.intersection(needed))
            st.predicted, st.actual = st.predicted + len(pred), st.actual + len(needed)
            st.correct += correct
            self.gate.record(i, len(pred), correct)

    def _predict(self, i: int, x_flat: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Apply the next MoE layer's norm and gate to layer i's residual stream x_flat
        [T, d] (the cross-layer gate) -> (that layer, [E] bool on the device: the experts
        it names whose predicted weight reaches prefetch_min_weight for some token and that
        skip_miss_weight would not skip nor miss_quant_weight stand in for). Waits for
        nothing."""
        j = self.next_moe[i]
        nxt = self.model.layers[j]
        ids, w = nxt.mlp.router.select(nxt.mlp_norm(x_flat))
        bar = self.scfg.prefetch_min_weight
        light = max(self.scfg.skip_miss_weight, self.scfg.miss_quant_weight)
        E = self.cfg.moe.num_experts
        if bar <= 0 and light <= 0:  # every expert named (the default): 2 launches, not 6
            return j, experts_named(ids, E)
        want = w >= bar
        if light > 0:  # no copy ahead of an expert the layer would skip or stand in for
            want &= kept_pairs(w, light)
        named = torch.zeros(E, dtype=torch.int32, device=ids.device)
        return j, named.index_add_(0, ids.flatten(), want.flatten().to(torch.int32)) > 0

    def _copy_ahead(self, j: int, pred: list[int], protected) -> None:
        """Start copying layer j's predicted experts, evicting nothing in protected (the
        experts the running layer uses)."""
        self.prefetch_stats.copied += 1
        self.cache.prefetch([(j, e) for e in pred], protected, self.scfg.prefetch_fraction)

    def _prefetch_next(self, i: int, x_flat: torch.Tensor, protected) -> None:
        """Predict the next MoE layer's experts from layer i's residual stream (_predict)
        and start copying them, evicting nothing in protected. While the gate withholds
        that layer's copies (its recent precision under prefetch_min_precision) the
        prediction is only kept, as a mask on the device, to be scored when it runs."""
        j, named = self._predict(i, x_flat)
        if not self.gate.allow(j):  # scored later; nothing here waits for the device
            self._predicted[j] = named
            self.prefetch_stats.withheld += 1
            return
        pred = [e for e, n in enumerate(named.tolist()) if n]
        self._predicted[j] = set(pred)
        self._copy_ahead(j, pred, protected)

    def _experts(self, flat, ids, w, slots: dict[int, int],
                 cache: ExpertCache | None = None, whole: bool = False) -> torch.Tensor:
        """Sum over the (token, expert) pairs whose expert sits in `slots` of weight * expert
        output, by the grouped kernels over the slot pool of cache (the expert cache);
        whole: every pair's expert is in slots (none to leave out)."""
        # pinned on CUDA: a copy from pageable memory may wait for the stream, which holds
        # the layer's expert copies just queued, and the host would issue nothing more (the
        # next layer's attention and routing) until they landed
        table = [-1] * self.cfg.moe.num_experts
        for e, s in slots.items():
            table[e] = s
        sid = torch.tensor(table, pin_memory=self.device.type == "cuda").to(
            self.device, non_blocking=True)[ids]
        return self._run_experts(flat, sid, w, cache or self.cache, whole)

    def _run_experts(self, flat, sid, w, c: ExpertCache, whole: bool) -> torch.Tensor:
        """flat [T, d], sid [T, k]: the pairs' slots in c's pool (-1: elsewhere, unless
        whole), w [T, k] -> [T, d]: the sum of weight * expert output over the pairs."""
        m = self.cfg.moe
        backend = m.kernel_backend
        if whole:
            d = sort_by_expert(sid, c.n_slots, backend=backend)
        else:  # the pairs of experts elsewhere are left out (their weight 0)
            dropped = sid < 0
            d = sort_by_expert(sid.clamp(min=0), c.n_slots, dropped, backend=backend)
            w = w.masked_fill(dropped, 0)
        with without_host_waits():  # no GEMM that reads back (the host issues on meanwhile)
            return expert_mlp(flat, c.w_in, c.w_out, d, m.expert_type, backend, True, c.b_in,
                              c.b_out, m.swiglu_alpha, m.swiglu_limit,
                              combine_weights=w.to(flat.dtype))

    def _fixed_hits(self) -> int:
        """The fixed steps' hits since load, from their host copy (host memory, read as
        such: no op that could wait for the device)."""
        return int(self._hits_host.numpy())

    def counters(self) -> dict[str, int]:
        """The raw cache and prefetch counts since reset_stats (stats(since=) takes them)."""
        now = {**asdict(self.cache.stats), **asdict(self.prefetch_stats), "low_precision": 0}
        now["hits"] += self._fixed_hits() - self._hits_base  # the fixed steps' hits
        if self.low_cache is not None:  # its copies count with the expert cache's
            low = self.low_cache.stats
            now["bytes_to_device"] += low.bytes_to_device
            now["low_precision"] = low.hits + low.misses
        return now

    def stats(self, since: dict[str, int] | None = None) -> dict:
        """Hit rate, bytes moved, prefetch precision / recall since reset_stats, or since the
        counters() snapshot `since`."""
        now = self.counters()
        if since is not None:
            now = {k: v - since[k] for k, v in now.items()}
        c = CacheStats(**{k: now[k] for k in asdict(self.cache.stats)})
        p = PrefetchStats(**{k: now[k] for k in asdict(self.prefetch_stats)})
        return {"expert_hit_rate": c.hit_rate, "expert_hits": c.hits, "expert_misses": c.misses,
                "experts_prefetched": c.prefetched, "experts_on_host": c.on_host,
                "experts_skipped": c.skipped,
                "experts_low_precision": now["low_precision"],
                "bytes_to_device": c.bytes_to_device,
                "prefetch_precision": p.precision, "prefetch_recall": p.recall,
                "prefetch_copied": p.copied, "prefetch_withheld": p.withheld}

    def total_counters(self) -> dict[str, int]:
        """The raw cache and prefetch counts since the model was loaded (monitoring: they
        only grow, whatever reset_stats does)."""
        now = self.counters()
        return {k: v + self._before_reset.get(k, 0) for k, v in now.items()}

    def reset_stats(self) -> None:
        self._before_reset = self.total_counters()
        self._hits_base = self._fixed_hits()
        self.cache.stats = CacheStats()
        if self.low_cache is not None:
            self.low_cache.stats = CacheStats()
        self.prefetch_stats = PrefetchStats()
        self._predicted.clear()
