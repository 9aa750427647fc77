"""RMSNorm, rotary embeddings and grouped-query attention (HF Llama/Mixtral conventions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x [..., d] -> x / rms(x) * weight, computed in float32 (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [S] -> cos, sin [S, head_dim] (halves duplicated, rotate-half convention)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)
                  / head_dim)
    )
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd], cos/sin [S, hd] -> rotated x."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """x [B, S, d] -> [B, S, d]: causal GQA through scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 qk_norm: bool = False, eps: float = 1e-6, qk_norm_type: str = "head",
                 qkv_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.full_qk_norm = qk_norm_type == "full"
        q_dim, k_dim = ((n_heads * head_dim, n_kv_heads * head_dim) if self.full_qk_norm
                        else (head_dim, head_dim))
        self.q_norm = RMSNorm(q_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(k_dim, eps) if qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d], cos/sin [S, hd] or [B, S, hd] -> q [B, H, S, hd], k, v [B, Hkv, S, hd]
        (normed and rotated: what a KV cache stores)."""
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and self.full_qk_norm:  # OLMoE: over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.full_qk_norm:  # Qwen3: per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cos.dim() == 3:  # per-sequence positions (left-padded batches)
            cos, sin = cos[:, None], sin[:, None]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))
