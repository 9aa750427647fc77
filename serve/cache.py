"""The device expert cache: a slot pool allocated once, filled from the store, and an
eviction policy (LRU, LFU, layer-aware favouring shallow layers as Fate does, or next-use:
Belady's rule over the cyclic layer order).

Copies run on a side CUDA stream when one is given (prefetch) and on the compute stream
otherwise; a slot's ready event orders its use after its copy. Experts of the disk tier (the
memory-mapped files) are read by reader threads when there are any: the page faults of
several experts overlap each other and the device's work, each staged in pinned memory and
copied on a stream of its own (CUDA) or straight into its slot (CPU); the serving thread
waits only for the expert it is about to use.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kernels.quant import QuantWeight
from serve.store import WeightStore

Key = tuple[int, int]  # (layer, expert)


class Policy:
    """Eviction order over resident keys; `touch` on every use."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.clock = 0
        self.last: dict[Key, int] = {}
        self.count: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        self.clock += 1
        self.last[key] = self.clock
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=self.score)

    def score(self, key: Key) -> float:  # lowest is evicted first
        raise NotImplementedError


class LRU(Policy):
    """Least recently used first."""

    def score(self, key: Key) -> float:
        return self.last.get(key, 0)


class LFU(Policy):
    """Least frequently used first (counts since load), ties by recency."""

    def score(self, key: Key) -> float:
        return self.count.get(key, 0) + self.last.get(key, 0) / (self.clock + 1)


class LayerAware(Policy):
    """Recency with deep layers ageing faster: an expert of layer l looks (1 + l / L) times
    older than it is, so shallow layers keep more of theirs (Fate's shallow-favouring
    cache: the first layers are the hardest to prefetch, having no earlier gate signal)."""

    def score(self, key: Key) -> float:
        age = self.clock - self.last.get(key, 0)
        return -age * (1.0 + key[0] / max(self.n_layers, 1))


class NextUse(Policy):
    """Belady's rule for decode's cyclic layer order: evict first the expert whose layer comes
    round again last (the layer running now, then the one before it, ...), least recently
    used first within a layer. LRU does the opposite when the experts a step needs outgrow
    the slots (batched decode): it evicts the next layers' experts just before their use."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self.layer = 0  # the layer of the last use

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.layer = key[0]

    def score(self, key: Key) -> float:
        ahead = (key[0] - self.layer) % self.n_layers or self.n_layers  # layers to its turn
        return -ahead * (self.clock + 1) + self.last.get(key, 0)


POLICIES = {"lru": LRU, "lfu": LFU, "layer": LayerAware, "next-use": NextUse}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # experts copied ahead of their layer
    on_host: int = 0  # expert uses run on the host CPU (neither hits nor misses)
    skipped: int = 0  # missing experts of low weight left out (serve/skip.py)
    completed: int = 0  # experts copied ahead in part, the rest copied when used
    bytes_to_device: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


class ExpertCache:
    """n_slots experts on `device`: w_in [S, 2F, d], w_out [S, d, F] (and b_in [S, 2F],
    b_out [S, d] for experts with biases) in dtype, or, for int8 / int4 / MXFP4 / FP8
    experts, as QuantWeight stacks that stay packed on the device (the GEMMs dequantize
    them), so a budget holds 2-4x more experts than bf16 slots."""

    def __init__(self, store: WeightStore, n_slots: int, policy: str, device: torch.device,
                 dtype: torch.dtype, side_stream: torch.cuda.Stream | None = None,
                 readers: int = 0):
        """readers: threads that read the disk tier's experts (0: the serving thread)."""
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if n_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        cfg = store.cfg
        F, d = cfg.moe.expert_ffn, cfg.d_model
        self.store, self.device, self.dtype = store, device, dtype
        self.n_slots = n_slots
        self.w_in: torch.Tensor | QuantWeight
        self.w_out: torch.Tensor | QuantWeight
        if store.bits is not None and store.moe_layers:
            probe = store.expert(store.moe_layers[0], 0)
            self.w_in = probe.w_in.empty_stack(n_slots, device)
            self.w_out = probe.w_out.empty_stack(n_slots, device)
        else:
            self.w_in = torch.empty(n_slots, 2 * F, d, dtype=dtype, device=device)
            self.w_out = torch.empty(n_slots, d, F, dtype=dtype, device=device)
        self.b_in = self.b_out = None  # GPT-OSS's expert biases, in dtype
        if cfg.moe.expert_bias:
            self.b_in = torch.empty(n_slots, 2 * F, dtype=dtype, device=device)
            self.b_out = torch.empty(n_slots, d, dtype=dtype, device=device)
        self.policy: Policy = POLICIES[policy](cfg.n_layers)
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * n_slots
        self.stats = CacheStats()
        self.side = side_stream
        self.ready: list[torch.cuda.Event | None] = [None] * n_slots
        self._pool = (ThreadPoolExecutor(readers, thread_name_prefix="moe-serve-reader")
                      if readers and store.n_disk else None)
        # demand reads copy on a stream of their own (not behind the prefetches)
        self._reader = (torch.cuda.Stream(device) if self._pool is not None
                        and device.type == "cuda" else None)
        self.pending: list[Future | None] = [None] * n_slots  # a reader filling the slot
        # slots copied ahead in part: slot -> (rows of w_in, rows of w_out) copied so far
        self.partial: dict[int, tuple[int, int]] = {}

    @staticmethod
    def slot_nbytes(store: WeightStore, dtype: torch.dtype) -> int:
        """Device bytes of one slot: one expert in dtype, or packed as the store keeps it."""
        if store.bits is not None:
            return store.expert_nbytes
        cfg = store.cfg
        F, d = cfg.moe.expert_ffn, cfg.d_model
        biases = 2 * F + d if cfg.moe.expert_bias else 0
        return (3 * F * d + biases) * (torch.finfo(dtype).bits // 8)

    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    @property
    def empty(self) -> int:
        """Slots holding no expert (a miss takes one without evicting)."""
        return self.n_slots - len(self.slot_of)

    def _free_slot(self, protected: set[Key]) -> int | None:
        for s, k in enumerate(self.key_of):
            if k is None:
                return self._settled(s)
        candidates = [k for k in self.slot_of if k not in protected]
        if not candidates:
            return None
        victim = self.policy.victim(candidates)
        s = self.slot_of.pop(victim)
        self.key_of[s] = None
        return self._settled(s)

    def _settled(self, s: int) -> int:
        """Slot s, once a reader filling it is done (its copy ordered by ready[s])."""
        f = self.pending[s]
        if f is not None:
            self.pending[s] = None
            try:
                self.ready[s] = f.result()  # a reader's error surfaces here
            except BaseException:
                key, self.key_of[s], self.ready[s] = self.key_of[s], None, None
                self.slot_of.pop(key, None)  # the slot holds no expert it can serve
                raise
        return s

    def _write(self, src, s: int, stream: torch.cuda.Stream | None,
               start: tuple[int, int] = (0, 0), stop: tuple[int, int] | None = None):
        """Copy expert src into slot s (on stream, else the current one) -> its event. start
        / stop: only rows [start, stop) of w_in and of w_out (dense slots; the biases go with
        the part that ends at the last rows)."""
        nb = self.device.type == "cuda"
        if start == (0, 0) and stop is None:
            self.w_in[s].copy_(src.w_in, non_blocking=nb)
            self.w_out[s].copy_(src.w_out, non_blocking=nb)
        else:
            (a_in, a_out), (b_in, b_out) = start, stop or (None, None)
            self.w_in[s, a_in:b_in].copy_(src.w_in[a_in:b_in], non_blocking=nb)
            self.w_out[s, a_out:b_out].copy_(src.w_out[a_out:b_out], non_blocking=nb)
        if self.b_in is not None and stop is None:
            self.b_in[s].copy_(src.b_in, non_blocking=nb)
            self.b_out[s].copy_(src.b_out, non_blocking=nb)
        if not nb:
            return None
        ev = torch.cuda.Event()
        ev.record(stream or torch.cuda.current_stream(self.device))
        return ev

    def _part_rows(self, fraction: float) -> tuple[int, int]:
        """The first rows of w_in, then of w_out, that hold `fraction` of a dense expert."""
        (n_in, d), (n_out, f) = self.w_in.shape[1:], self.w_out.shape[1:]
        want = math.ceil(fraction * (n_in * d + n_out * f))
        rows_in = min(n_in, -(-want // d))
        return rows_in, min(n_out, max(0, -(-(want - rows_in * d) // f)))

    def _rows_nbytes(self, rows: tuple[int, int]) -> int:
        return (rows[0] * self.w_in.shape[2] + rows[1] * self.w_out.shape[2]) \
            * self.w_in.element_size()

    def _copy_in(self, key: Key, s: int, stream: torch.cuda.Stream | None,
                 fraction: float = 1.0) -> None:
        """Fill slot s with key's expert: on stream (a prefetch), else on the current stream,
        or, from the disk tier with readers, by a reader on stream or the readers' own. The
        copy waits for the slot's last one (they may run on different streams). fraction <
        1 (a prefetch of an unquantized expert in RAM): only its first rows (_part_rows);
        acquire copies the rest."""
        self.partial.pop(s, None)
        disk = self._pool is not None and not self.store.in_ram(key)
        if self.device.type == "cuda":
            to = stream or (self._reader if disk else torch.cuda.current_stream(self.device))
            if self.ready[s] is not None:
                to.wait_event(self.ready[s])
            stream = to
        if disk:
            self.pending[s] = self._pool.submit(self._read, key, s, stream)
            self.stats.bytes_to_device += self.store.expert_nbytes  # counted as it starts
            return
        src = self.store.expert(*key)
        if fraction < 1 and self.store.bits is None:
            rows = self._part_rows(fraction)
            self.ready[s] = self._write(src, s, stream, stop=rows)
            self.partial[s] = rows
            self.stats.bytes_to_device += self._rows_nbytes(rows)
            return
        self.ready[s] = self._write(src, s, stream)
        self.stats.bytes_to_device += src.nbytes

    def _complete(self, key: Key, s: int) -> None:
        """Copy the rest of key's expert, copied ahead in part into slot s, on the current
        stream (after the part's copy)."""
        rows = self.partial.pop(s)
        if self.device.type == "cuda" and self.ready[s] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])
        src = self.store.expert(*key)
        self.ready[s] = self._write(src, s, None, start=rows)
        self.stats.bytes_to_device += src.nbytes - self._rows_nbytes(rows)
        self.stats.completed += 1

    def _read(self, key: Key, s: int, stream: torch.cuda.Stream | None):
        """A reader thread: key's expert from the disk tier into slot s -> its event. On
        CUDA the pages are read into pinned memory here, then copied on stream."""
        src = self.store.expert(*key)
        if self.device.type != "cuda":
            return self._write(src, s, None)
        src = src.pin_memory()
        with torch.cuda.stream(stream):
            return self._write(src, s, stream)

    def prefetch(self, keys: list[Key], protected: set[Key], fraction: float = 1.0) -> None:
        """Copy the keys that are not resident, on the side stream, evicting nothing in
        protected (nor the keys themselves); fraction < 1: that share of each (_copy_in)."""
        keep = set(protected) | set(keys)
        stream = self.side
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # slot reuse after use
        for key in keys:
            if key in self.slot_of:
                continue
            s = self._free_slot(keep)
            if s is None:
                break
            if stream is not None:
                with torch.cuda.stream(stream):
                    self._copy_in(key, s, stream, fraction)
            else:
                self._copy_in(key, s, None, fraction)
            self.slot_of[key], self.key_of[s] = s, key
            self.stats.prefetched += 1

    def acquire(self, keys: list[Key]) -> dict[Key, int]:
        """The slots holding keys (a group that fits the slots), copying in the missing ones
        now (evicting none of keys): those of the disk tier by the readers, side by side;
        counts each hit or miss and touches the policy. The current stream waits for the
        copies."""
        return self._make_resident(keys, count=True)

    def fill(self, keys: list[Key]) -> None:
        """Make every one of keys resident (they must fit the slots), as acquire does but
        counting no hit or miss (their bytes count) and touching no policy: loading them all
        at once (serve.runtime's fixed-shape steps)."""
        if len(keys) > self.n_slots:
            raise ValueError(f"{len(keys)} experts do not fit {self.n_slots} slots")
        self._make_resident(keys, count=False)

    def _make_resident(self, keys: list[Key], count: bool) -> dict[Key, int]:
        protected, slots = set(keys), {}
        current = torch.cuda.current_stream(self.device) if self.device.type == "cuda" \
            else None
        if self._reader is not None:
            self._reader.wait_stream(current)  # a slot is reused after its last use
        for key in keys:
            s = self.slot_of.get(key)
            if s is None:
                self.stats.misses += count
                s = self._free_slot(protected)
                if s is None:
                    raise RuntimeError("expert cache: every slot is protected; this is a bug")
                self._copy_in(key, s, None)
                self.slot_of[key], self.key_of[s] = s, key
            else:
                self.stats.hits += count
                if s in self.partial:  # copied ahead in part: the rest now
                    self._complete(key, s)
            if count:
                self.policy.touch(key)
            slots[key] = s
        for s in slots.values():
            ev = self.ready[self._settled(s)]
            if ev is not None:
                current.wait_event(ev)
        return slots
