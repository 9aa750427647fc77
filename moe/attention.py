"""RMSNorm, rotary embeddings and grouped-query attention (HF Llama/Mixtral conventions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import RopeScaling


class RMSNorm(nn.Module):
    """x [..., d] -> x / rms(x) * weight, computed in float32 (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        # h * rsqrt(mean(h^2) + eps): one kernel on CUDA (torch's fused RMSNorm), the same
        # ops as written out on the CPU; the weight after the cast back, as HF rounds
        h = F.rms_norm(h, h.shape[-1:], eps=self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """-> (inverse frequencies [head_dim / 2] in float64 on `device`, the factor cos / sin
    are scaled by), with the scaling of Hugging Face's rope_parameters (default, linear,
    yarn)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
                               / head_dim)
    kind = "default" if scaling is None else scaling.type
    if kind == "default":
        return inv_freq, 1.0
    factor = scaling.factor
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind != "yarn":
        raise ValueError(f"RoPE scaling type {kind!r} is not supported")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.attention_factor
    if attn is None:
        attn = (mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
                if scaling.mscale and scaling.mscale_all_dim else mscale(factor))

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (head_dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device=device) - low)
            / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attn)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [S] -> cos, sin [S, head_dim] (halves duplicated, rotate-half convention)."""
    inv_freq, attn = rope_inv_freq(head_dim, theta, scaling, positions.device)
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attn).to(dtype), (emb.sin() * attn).to(dtype)


def causal_mask(q_pos: torch.Tensor, n_keys: int, window: int | None = None) -> torch.Tensor:
    """q_pos [..., S] (query positions) -> bool [..., S, n_keys]: key j is visible when
    j <= q and, with a sliding window, j > q - window."""
    k = torch.arange(n_keys, device=q_pos.device)
    q = q_pos[..., None]
    return (k <= q) & (k > q - window) if window is not None else k <= q


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd], cos/sin [S, r] with r <= hd -> x with its first r dims rotated (all
    of them unless the rotary embedding is partial, as in GLM)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True: visible) -> the same shape in dtype: 0 where visible, -inf
    elsewhere (what SDPA makes of a bool mask at each call)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


def sink_mask(mask: torch.Tensor, sinks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mask [B | 1, 1, S, N], bool (True: visible) or already additive (additive_mask),
    sinks [H] -> float mask [B | 1, H, S, 1 + N] for keys whose first is a zero key: its
    logit q . 0 + sinks[h] is the sink."""
    H, S = sinks.shape[0], mask.shape[-2]
    bias = mask if mask.is_floating_point() else additive_mask(mask, dtype)
    bias = bias.expand(mask.shape[0], H, S, mask.shape[-1])
    sink = sinks.to(dtype).view(1, H, 1, 1).expand(mask.shape[0], H, S, 1)
    return torch.cat([sink, bias], -1)


def with_sinks(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention sinks (GPT-OSS) as one more key: k [B, Hkv, N, dk], v [B, Hkv, N, dv], mask
    bool [B | 1, 1, S, N], sinks [H] -> (k, v with a zero key / value put first, float mask
    [B | 1, H, S, 1 + N]). Every query's softmax then also spends weight on a sink that
    adds nothing, which is what eager attention with sinks computes."""
    zk = k.new_zeros(*k.shape[:2], 1, k.shape[3])
    zv = v.new_zeros(*v.shape[:2], 1, v.shape[3])
    return torch.cat([zk, k], 2), torch.cat([zv, v], 2), sink_mask(mask, sinks, k.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window: int | None = None, scale: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, S, dk], k [B, Hkv, S, dk], v [B, Hkv, S, dv] (Hkv divides H) -> [B, H, S, dv]:
    each query sees the keys up to its own position (the last `window` of them), and the
    per-head sink logits sinks [H] when given."""
    S = q.shape[2]
    mask = None if window is None or window >= S else causal_mask(
        torch.arange(S, device=q.device), S, window)
    if sinks is not None:
        if mask is None:
            mask = causal_mask(torch.arange(S, device=q.device), S)
        k, v, mask = with_sinks(k, v, mask[None, None], sinks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    """x [B, S, d] -> [B, S, d]: causal GQA through scaled_dot_product_attention (with
    GPT-OSS's per-head sink logits when `sinks`)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 qk_norm: bool = False, eps: float = 1e-6, qk_norm_type: str = "head",
                 qkv_bias: bool = False, clip_qkv: float | None = None, o_bias: bool = False,
                 sinks: bool = False):
        super().__init__()
        self.clip_qkv = clip_qkv
        self.scale: float | None = None  # scaled_dot_product_attention's default
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None  # GPT-OSS
        self.full_qk_norm = qk_norm_type == "full"
        q_dim, k_dim = ((n_heads * head_dim, n_kv_heads * head_dim) if self.full_qk_norm
                        else (head_dim, head_dim))
        self.q_norm = RMSNorm(q_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(k_dim, eps) if qk_norm else None
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see fuse_qkv

    def fuse_qkv(self, device: torch.device | None = None) -> None:
        """Inference: the q, k and v projections' weights (and biases) become views of one
        [(H + 2 Hkv) hd, d] weight, so that project runs one GEMM instead of three (and,
        without q / k norms or clipping, rotates q and k together); no memory is added.
        device: where the joint weight goes (fused on the host first, the device holds only
        it, never the three as well)."""
        lins = (self.q_proj, self.k_proj, self.v_proj)
        fused = []
        for name in ("weight", "bias"):
            parts = [getattr(m, name) for m in lins]
            if parts[0] is None:
                fused.append(None)
                continue
            joint = torch.cat([p.detach() for p in parts]).to(device or parts[0].device)
            at = 0
            for m, p in zip(lins, parts, strict=True):  # a new Parameter: any device
                setattr(m, name, nn.Parameter(joint[at:at + p.shape[0]], p.requires_grad))
                at += p.shape[0]
            fused.append(joint)
        self.qkv = (fused[0], fused[1])

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d], cos/sin [S, hd] or [B, S, hd] -> q [B, H, S, hd], k, v [B, Hkv, S, hd]
        (normed and rotated: what a KV cache stores)."""
        B, S, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if cos.dim() == 3:  # per-sequence positions (left-padded batches)
            cos, sin = cos[:, None], sin[:, None]
        if self.qkv is not None:
            qkv = F.linear(x, *self.qkv)
            if self.q_norm is None and self.clip_qkv is None:  # q and k rotated as one
                qk = apply_rope(qkv[..., :(H + Hkv) * hd].view(B, S, H + Hkv, hd)
                                .transpose(1, 2), cos, sin)
                v = qkv[..., (H + Hkv) * hd:].view(B, S, Hkv, hd).transpose(1, 2)
                return qk[:, :H], qk[:, H:], v
            q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and self.full_qk_norm:  # OLMoE: over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # OLMoE: after its full-width norms
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.full_qk_norm:  # Qwen3: per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                window: int | None = None) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d]; causal, over the last `window` keys when given."""
        B, S, _ = x.shape
        o = causal_attention(*self.project(x, cos, sin), window, self.scale, self.sinks)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))
