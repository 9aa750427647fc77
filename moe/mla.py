"""Multi-head latent attention (MLA, DeepSeek-V2 / V3).

Queries come from x directly (q_proj) or through a low-rank, normed bottleneck (q_a_proj ->
q_a_norm -> q_b_proj). Keys and values come from one latent per token: kv_a_proj gives a
kv_lora_rank latent (normed, then expanded per head by kv_b_proj into the no-RoPE half of
the key and the value) and one rope_dim key part shared by all heads. Only the rope_dim
parts are rotated; RoPE is in the rotate-half layout (moe.hf_import permutes DeepSeek's interleaved
rows on import).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.attention import RMSNorm, apply_rope, causal_attention
from moe.config import MLAConfig, ModelConfig


class MLAttention(nn.Module):
    """x [B, S, d] -> [B, S, d]: causal MLA through scaled_dot_product_attention; every head
    has its own key (nope_dim + rope_dim) and value (v_dim)."""

    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig, eps: float = 1e-6,
                 scale: float | None = None):
        super().__init__()
        self.n_heads = self.n_kv_heads = n_heads
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.head_dim = self.nope + self.rope  # of queries and keys
        self.kv_rank = cfg.kv_lora_rank
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        q_out = n_heads * self.head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj = nn.Linear(d_model, self.kv_rank + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_dim, d_model, bias=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] -> q [B, H, S, head_dim], not yet rotated."""
        B, S, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(
            self.q_a_norm(self.q_a_proj(x)))
        return q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d], cos/sin [S, rope_dim] or [B, S, rope_dim] -> q, k [B, H, S, head_dim],
        v [B, H, S, v_dim] (rotated: what a KV cache stores)."""
        B, S, _ = x.shape
        H = self.n_heads
        q = self._query(x)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.v_dim], dim=-1)
        if cos.dim() == 3:  # per-sequence positions
            cos, sin = cos[:, None], sin[:, None]
        q_rope = apply_rope(q[..., self.nope:], cos, sin)
        k_rope = apply_rope(k_rope[:, None], cos, sin).expand(B, H, S, self.rope)
        q = torch.cat([q[..., :self.nope], q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        return q, k, v

    # -- the latent form (serving): keys are the cached latents, W_UK and W_UV absorbed -----
    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as W_UK [H, nope, kv_rank] and W_UV [H, v_dim, kv_rank]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> q [B, H, S, kv_rank + rope_dim] (the no-RoPE query taken into latent
        space by W_UK, then its rotated part) and the cache entry [B, 1, S, kv_rank +
        rope_dim] (the normed latent, then the rotated RoPE key): scores
        q . entry equal the expanded q . k, and the first kv_rank columns of the entries are
        the values whose attention-weighted sum latent_out expands by W_UV."""
        q = self._query(x)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        w_uk, _ = self._kv_b()
        q_lat = torch.einsum("bhsn,hnr->bhsr", q[..., :self.nope], w_uk)
        q = torch.cat([q_lat, apply_rope(q[..., self.nope:], cos, sin)], dim=-1)
        entry = torch.cat([self.kv_a_norm(latent)[:, None],
                           apply_rope(k_rope[:, None], cos, sin)], dim=-1)
        return q, entry

    def latent_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, H, S, kv_rank] (attention over the cached latents) -> [B, S, d]."""
        B, H, S, _ = o.shape
        _, w_uv = self._kv_b()
        v = torch.einsum("bhsr,hvr->bhsv", o, w_uv)
        return self.o_proj(v.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                window: int | None = None) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d]; causal, over the last `window` keys when given."""
        B, S, _ = x.shape
        o = causal_attention(*self.project(x, cos, sin), window, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1 / sqrt(query head width), times DeepSeek's YaRN correction mscale(factor,
    mscale_all_dim)^2 when its RoPE is scaled."""
    m, rs = cfg.mla, cfg.rope_scaling
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    if rs.type != "default" and rs.mscale_all_dim and rs.factor > 1:
        corr = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
        scale *= corr * corr
    return scale
