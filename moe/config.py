"""Typed model configuration (Hydra fills these in `train/`; tests build them directly)."""

from __future__ import annotations

from dataclasses import dataclass, field

from routing.config import RouterConfig


@dataclass
class MoEConfig:
    """One MoE feed-forward layer.

    expert_ffn: hidden size F of each routed expert. expert_type: "swiglu" or "gelu".
    num_shared_experts: dense experts every token passes through (DeepSeek / Qwen2-MoE), fused
    into one MLP of size shared_expert_ffn (default num_shared_experts * expert_ffn), gated by
    sigmoid(x . g) when shared_expert_gate (Qwen2-MoE).
    kernel_backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    """

    num_experts: int = 8
    expert_ffn: int = 256
    expert_type: str = "swiglu"
    router: RouterConfig = field(default_factory=RouterConfig)
    num_shared_experts: int = 0
    shared_expert_ffn: int | None = None
    shared_expert_gate: bool = False
    kernel_backend: str = "auto"

    def check(self) -> None:
        if self.expert_type not in ("swiglu", "gelu"):
            raise ValueError(f"expert_type must be swiglu or gelu, got {self.expert_type!r}")
        if self.expert_ffn < 1:
            raise ValueError(f"expert_ffn must be >= 1, got {self.expert_ffn}")
        self.router.check(self.num_experts)


@dataclass
class ModelConfig:
    """Decoder-only MoE transformer: RMSNorm, RoPE, grouped-query attention, MoE/dense MLPs.

    Layer i is an MoE layer when i >= first_dense_layers and (i + 1) % moe_layer_freq == 0
    (Qwen-MoE's decoder_sparse_step; DeepSeek's first_k_dense_replace); otherwise a dense
    MLP of size dense_ffn.
    """

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qk_norm_type: str = "head"  # "head": RMSNorm per head (Qwen3); "full": over q / k (OLMoE)
    qkv_bias: bool = False  # biases on q, k, v projections (Qwen2-MoE)
    dense_ffn: int = 512
    moe: MoEConfig = field(default_factory=MoEConfig)
    moe_layer_freq: int = 1
    first_dense_layers: int = 0
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers and (i + 1) % self.moe_layer_freq == 0

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.qk_norm_type not in ("head", "full"):
            raise ValueError(f"qk_norm_type must be head or full, got {self.qk_norm_type!r}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        self.moe.check()
