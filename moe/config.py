"""Typed model configuration (Hydra fills these in `train/`; tests build them directly)."""

from __future__ import annotations

from dataclasses import dataclass, field

from routing.config import RouterConfig

EXPERT_TYPES = ("swiglu", "gelu", "clamped_swiglu")


@dataclass
class MoEConfig:
    """One MoE feed-forward layer.

    expert_ffn: hidden size F of each routed expert. expert_type: "swiglu", "gelu" or
    "clamped_swiglu" (GPT-OSS: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g) with
    g = min(gate, l), l = swiglu_limit, alpha = swiglu_alpha).
    expert_bias: biases on both expert projections (GPT-OSS).
    num_shared_experts: dense experts every token passes through (DeepSeek / Qwen2-MoE), fused
    into one MLP of size shared_expert_ffn (default num_shared_experts * expert_ffn), gated by
    sigmoid(x . g) when shared_expert_gate (Qwen2-MoE).
    kernel_backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    """

    num_experts: int = 8
    expert_ffn: int = 256
    expert_type: str = "swiglu"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router: RouterConfig = field(default_factory=RouterConfig)
    num_shared_experts: int = 0
    shared_expert_ffn: int | None = None
    shared_expert_gate: bool = False
    kernel_backend: str = "auto"

    def check(self) -> None:
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {', '.join(EXPERT_TYPES)}, got "
                             f"{self.expert_type!r}")
        if self.expert_type == "clamped_swiglu" and not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit must be > 0, got {self.swiglu_limit}")
        if self.expert_ffn < 1:
            raise ValueError(f"expert_ffn must be >= 1, got {self.expert_ffn}")
        self.router.check(self.num_experts)


ROPE_TYPES = ("default", "linear", "yarn")


@dataclass
class RopeScaling:
    """RoPE frequency scaling, as Hugging Face's rope_parameters spell it.

    type: "default" (none), "linear" (every frequency / factor) or "yarn" (NTK-by-parts:
    frequencies with fewer than beta_slow rotations over original_max_seq_len are divided by
    factor, those with more than beta_fast kept, a linear ramp between; cos / sin scaled by
    attention_factor, by default 0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio).
    """

    type: str = "default"
    factor: float = 1.0
    original_max_seq_len: int | None = None  # yarn: the pre-training context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def check(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"RoPE scaling type {self.type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        if self.type != "default" and not self.factor > 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.type == "yarn" and not (self.original_max_seq_len or 0) > 0:
            raise ValueError("yarn RoPE scaling needs original_max_seq_len (the pre-training "
                             "context)")


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 / V3): queries through an optional
    q_lora_rank bottleneck, keys and values expanded from one kv_lora_rank latent per token;
    each query / key head is qk_nope_head_dim + qk_rope_head_dim wide (only the rope part
    rotated, its key part shared by all heads), each value head v_head_dim."""

    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def check(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"mla.{name} must be >= 1, got {getattr(self, name)}")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"mla.qk_rope_head_dim must be even and >= 2, got "
                             f"{self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"mla.q_lora_rank must be >= 1 or None, got {self.q_lora_rank}")


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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    partial_rotary_factor: float = 1.0  # RoPE turns the first fraction of each head (GLM)
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qk_norm_type: str = "head"  # "head": RMSNorm per head (Qwen3); "full": over q / k (OLMoE)
    qkv_bias: bool = False  # biases on q, k, v projections (Qwen2-MoE)
    o_bias: bool = False  # a bias on the output projection (GPT-OSS)
    attn_sinks: bool = False  # a learned per-head logit every query also attends to (GPT-OSS)
    clip_qkv: float | None = None  # clamp q, k, v to [-c, c] after projection (OLMoE)
    sliding_window: int | None = None  # a query sees its last `sliding_window` keys
    sliding_window_layers: list[int] | None = None  # the layers it applies to (None: all)
    mla: MLAConfig | None = None  # multi-head latent attention instead of GQA (DeepSeek)
    dense_ffn: int = 512
    moe: MoEConfig = field(default_factory=MoEConfig)
    moe_layer_freq: int = 1
    first_dense_layers: int = 0
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The width RoPE rotates: the head, or MLA's rope part."""
        if self.mla:
            return self.mla.qk_rope_head_dim
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """(key / value heads, key width, value width) of attention (MLA: expanded per head;
        the served KV cache keeps MLA's latents instead, serve.runtime.KVCache)."""
        if self.mla:
            m = self.mla
            return self.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        return self.n_kv_heads, self.resolved_head_dim, self.resolved_head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """asdict(cfg) (e.g. read back from JSON) -> cfg; fields it lacks take defaults."""
        from routing.config import RouterConfig

        raw = dict(raw)
        moe = dict(raw.get("moe", {}))
        moe["router"] = RouterConfig(**moe.get("router", {}))
        raw["moe"] = MoEConfig(**moe)
        raw["rope_scaling"] = RopeScaling(**raw.get("rope_scaling", {}))
        if raw.get("mla") is not None:
            raw["mla"] = MLAConfig(**raw["mla"])
        return cls(**raw)

    def window(self, i: int) -> int | None:
        """The sliding attention window of layer i (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        layers = self.sliding_window_layers
        return self.sliding_window if layers is None or i in layers else None

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
        if self.mla is not None:
            self.mla.check()
        elif not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got "
                             f"{self.partial_rotary_factor}")
        elif self.rope_dim % 2 or self.rope_dim < 2:
            raise ValueError(f"RoPE turns {self.rope_dim} dims of head_dim="
                             f"{self.resolved_head_dim}: it must be even and >= 2")
        if self.qk_norm_type not in ("head", "full"):
            raise ValueError(f"qk_norm_type must be head or full, got {self.qk_norm_type!r}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.mla is not None and (self.attn_sinks or self.o_bias):
            raise ValueError("attention sinks and o_bias are for grouped-query attention, "
                             "not MLA")
        dense = any(not self.is_moe_layer(i) for i in range(self.n_layers))
        if self.moe.expert_type == "clamped_swiglu" and (dense or self.moe.num_shared_experts):
            raise ValueError("clamped_swiglu experts (GPT-OSS) need every layer MoE and no "
                             "shared experts")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"clip_qkv must be > 0 or None, got {self.clip_qkv}")
        self.rope_scaling.check()
        self.moe.check()
