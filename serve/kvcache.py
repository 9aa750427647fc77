"""The KV cache of the served model (serve.runtime.OffloadedModel): one row per sequence,
allocated once, in the compute dtype or as int8 codes with a scale per token, head and group
of GROUP channels (ServeConfig.kv_cache_dtype "int8": half the bytes of bf16, so the budget
holds more expert slots; each entry read back within half a code step of what was written).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serve.config import KV_CACHE_DTYPES

GROUP = 64  # channels per int8 scale (a whole head or latent when smaller or not divisible)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i in range(n) if a[i] != b[i])


class KVCache:
    """k, v [n_layers, max_batch, n_kv_heads, max_context, head_dim], allocated once. With
    multi-head latent attention, k [n_layers, max_batch, 1, max_context, kv_lora_rank +
    rope_dim] holds each token's latent and RoPE key (the expanded keys and values of every
    head are never stored: 1 / 9 of their bytes at DeepSeek-V2-Lite's shapes) and v is None.
    With attention sinks (GPT-OSS) position p sits at index p + 1 (`offset`), and index 0
    holds a zero key and value, the sink's.

    quant "int8": k, v hold int8 codes and k_scale, v_scale [..., max_context, groups] their
    scales (put quantizes, get dequantizes the rows and positions read).

    held[row]: the tokens whose entries row holds at positions 0, 1, ... (what a later prompt
    with the same prefix need not read again; see serve.generate.DecodeBatch). Every write
    forgets the row's tokens from where it starts; the writer then `records` what it wrote.
    scores[row]: beside held, each token's log-probability entry after those before it (as
    Row.prompt_logprobs has them), or None where none was computed, so that a prompt whose
    tokens must all be scored can still take the scored prefix a row holds."""

    def __init__(self, cfg, max_batch, max_context, dtype, device, quant: str = "auto"):
        if quant not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {quant!r}")
        heads, k_dim, v_dim = self.dims(cfg)
        self.offset, self.dtype, self.quant = int(cfg.attn_sinks), dtype, quant == "int8"
        shape = (cfg.n_layers, max_batch, heads, max_context + self.offset)
        store = torch.int8 if self.quant else dtype
        self.k = torch.zeros(*shape, k_dim, dtype=store, device=device)
        self.v = torch.zeros(*shape, v_dim, dtype=store, device=device) if v_dim else None
        self.k_scale = self.v_scale = None
        if self.quant:
            self.k_scale = torch.zeros(*shape, k_dim // _group(k_dim), dtype=dtype,
                                       device=device)
            if v_dim:
                self.v_scale = torch.zeros(*shape, v_dim // _group(v_dim), dtype=dtype,
                                           device=device)
        self.held: list[list[int]] = [[] for _ in range(max_batch)]
        self.scores: list[list] = [[] for _ in range(max_batch)]

    def put(self, layer: int, which: str, rows: torch.Tensor, pos: torch.Tensor,
            vals: torch.Tensor) -> None:
        """Write vals [P, heads, dim] (which: "k" or "v") at (rows[p], pos[p]) of layer."""
        data = self.k if which == "k" else self.v
        if not self.quant:
            data[layer][rows, :, pos] = vals
            return
        codes, scale = _quantize(vals)
        data[layer][rows, :, pos] = codes
        (self.k_scale if which == "k" else self.v_scale)[layer][rows, :, pos] = scale

    def get(self, layer: int, which: str, rows: slice | torch.Tensor, n: int) -> torch.Tensor:
        """Entries [len(rows), heads, n, dim] of layer's first n positions, in dtype."""
        data = (self.k if which == "k" else self.v)[layer][rows, :, :n]
        if not self.quant:
            return data
        scale = (self.k_scale if which == "k" else self.v_scale)[layer][rows, :, :n]
        return _dequantize(data, scale, self.dtype)

    def forget(self, row: int, start: int) -> None:
        """Row `row` is written from position `start` on: its tokens from there are unknown."""
        del self.held[row][start:]
        del self.scores[row][start:]

    def record(self, row: int, start: int, tokens: Sequence[int]) -> None:
        """Positions [start, start + len(tokens)) of `row` now hold `tokens`' entries (kept
        only when the row's tokens before `start` are known)."""
        held = self.held[row]
        if len(held) == start:
            held.extend(tokens)
            self.scores[row].extend([None] * len(tokens))

    def score(self, row: int, entries: Sequence) -> None:
        """The log-probability entries of the tokens row holds from position 0 (as many as
        it holds)."""
        n = min(len(entries), len(self.held[row]))
        self.scores[row][:n] = entries[:n]

    def scored(self, row: int, top: int) -> int:
        """How many leading positions of row have a score with at least `top` alternatives
        (position 0 needs none: nothing comes before it)."""
        s = self.scores[row]
        n = 1 if s else 0
        while n < len(s) and s[n] is not None and len(s[n][1]) >= top:
            n += 1
        return n

    def common(self, row: int, ids: Sequence[int]) -> int:
        """How many leading tokens of ids row holds."""
        return common_prefix(self.held[row], ids)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row dst takes row src's first n positions (and their tokens)."""
        self.copy_entries(src, dst, n)
        self.held[dst] = self.held[src][:n]
        self.scores[dst] = self.scores[src][:n]

    def copy_entries(self, src: int, dst: int, n: int, layer: int | None = None) -> None:
        """Row dst takes row src's keys and values of positions [0, n), in every layer or
        in one (the caller keeps held and scores)."""
        end, at = n + self.offset, slice(None) if layer is None else layer
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is not None:
                t[at, dst, :, :end] = t[at, src, :, :end]

    @staticmethod
    def dims(cfg) -> tuple[int, int, int]:
        """(heads, key width, value width; 0: values are the keys' latent part)."""
        if cfg.mla is not None:
            return 1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim, 0
        return cfg.n_kv_heads, cfg.resolved_head_dim, cfg.resolved_head_dim

    @staticmethod
    def token_nbytes(cfg, dtype: torch.dtype, quant: str = "auto") -> int:
        """Bytes one position takes over all layers (one token's entry; int8: codes and
        their scales in dtype)."""
        heads, k_dim, v_dim = KVCache.dims(cfg)
        el = torch.finfo(dtype).bits // 8
        if quant != "int8":
            return cfg.n_layers * heads * (k_dim + v_dim) * el
        per = sum(d + el * (d // _group(d)) for d in (k_dim, v_dim) if d)
        return cfg.n_layers * heads * per

    @staticmethod
    def nbytes(cfg, max_batch: int, max_context: int, dtype: torch.dtype,
               quant: str = "auto") -> int:
        """Bytes of the whole cache (with the sink's position when there is one)."""
        return KVCache.token_nbytes(cfg, dtype, quant) * max_batch * (
            max_context + int(cfg.attn_sinks))


def _group(dim: int) -> int:
    """Channels per scale of an entry dim wide."""
    return GROUP if dim % GROUP == 0 else dim


def _quantize(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vals [..., dim] -> (int8 codes [..., dim], scales [..., dim / group] in vals' dtype):
    each group's largest magnitude maps to 127."""
    g = _group(vals.shape[-1])
    v = vals.float().unflatten(-1, (-1, g))
    scale = v.abs().amax(-1) / 127
    codes = torch.where(scale[..., None] > 0, v / scale[..., None].clamp(min=1e-30), 0.0)
    return codes.round().clamp(-127, 127).to(torch.int8).flatten(-2), scale.to(vals.dtype)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes [..., dim] and scales [..., dim / group] -> values [..., dim] in dtype."""
    g = codes.shape[-1] // scale.shape[-1]
    return (codes.unflatten(-1, (-1, g)).to(dtype) * scale[..., None]).flatten(-2)
