"""Decoder-only MoE transformer LM, configured by `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe.attention import Attention, RMSNorm, rope_cos_sin
from moe.config import ModelConfig
from moe.layer import MoELayer
from moe.mla import MLAttention, mla_softmax_scale
from moe.mlp import MLP
from routing import Routing

RECOMPUTE = ("none", "moe_act", "mlp", "block")


def check_recompute(mode: str) -> None:
    """ValueError unless mode is an activation-checkpointing mode (RECOMPUTE)."""
    if mode not in RECOMPUTE:
        raise ValueError(f"activation checkpointing must be one of {', '.join(RECOMPUTE)}, "
                         f"got {mode!r}")


@dataclass
class LMOutput:
    """logits [B, S, V]; losses are scalars (None without labels); one Routing per MoE layer."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None  # ce + aux_coef * aux + z_coef * z (+ entropy_coef * ent)
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers, unscaled
    z_loss: torch.Tensor | None = None  # mean over MoE layers, unscaled
    entropy_loss: torch.Tensor | None = None  # mean over MoE layers, unscaled (softmax routers)
    routings: list[Routing] = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)) with an MoE or dense MLP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.mla is not None:
            # the latent norms' eps is DeepSeek's 1e-6 whatever rms_norm_eps says (as
            # transformers builds them; GLM-4.7-Flash's layer norms take 1e-5)
            self.attn = MLAttention(cfg.d_model, cfg.n_heads, cfg.mla, 1e-6,
                                    mla_softmax_scale(cfg))
        else:
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
                                  cfg.resolved_head_dim, cfg.qk_norm, cfg.norm_eps,
                                  cfg.qk_norm_type, cfg.qkv_bias, cfg.clip_qkv, cfg.o_bias,
                                  cfg.attn_sinks)
        self.window = cfg.window(layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoELayer(cfg.d_model, cfg.moe, cfg.vocab_size)
        else:
            self.mlp = MLP(cfg.d_model, cfg.dense_ffn, cfg.moe.expert_type)

    recompute = "none"  # activation checkpointing of the block: "none", "mlp" or "block"

    def forward(self, x, cos, sin, token_ids):
        """x [B, S, d] -> (x [B, S, d], the MoE layer's Routing or None)."""
        if self.recompute == "none" or not torch.is_grad_enabled():
            return self._block(x, cos, sin, token_ids)
        if self.recompute == "block":
            return checkpoint(self._block, x, cos, sin, token_ids, use_reentrant=False)
        return checkpoint(self._mlp, self._attn(x, cos, sin), token_ids, use_reentrant=False)

    def _block(self, x, cos, sin, token_ids):
        return self._mlp(self._attn(x, cos, sin), token_ids)

    def _attn(self, x, cos, sin):
        return x + self.attn(self.attn_norm(x), cos, sin, self.window)

    def _mlp(self, x, token_ids):
        h = self.mlp_norm(x)
        if self.is_moe:
            y, routing = self.mlp(h, token_ids)
            return x + y, routing
        return x + self.mlp(h), None


class MoETransformer(nn.Module):
    """input_ids [B, S] (labels [B, S] aligned targets, -100 ignored) -> LMOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".q_norm." in name or ".k_norm." in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def set_activation_checkpointing(self, mode: str) -> None:
        """Keep fewer activations for backward and recompute them there: "moe_act" only the
        routed experts' SwiGLU activation (one SwiGLU kernel a layer in the backward, as
        megatron-core's moe_act; bias-free SwiGLU experts), "mlp" each block's MLP (an MoE
        layer's router, expert rows and SwiGLU, its largest activations; also its
        collectives under EP / FSSDP), "block" whole blocks, "none" keeps everything.
        Gradients are unchanged (routing is deterministic)."""
        check_recompute(mode)
        for layer in self.layers:
            layer.recompute = "none" if mode == "moe_act" else mode
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                experts.recompute_act = mode == "moe_act"

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> LMOutput:
        cfg = self.cfg
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={cfg.max_seq_len}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        x = self.embed(input_ids)
        pos = torch.arange(S, device=input_ids.device)
        cos, sin = rope_cos_sin(pos, cfg.rope_dim, cfg.rope_theta, x.dtype,
                                cfg.rope_scaling)
        token_ids = input_ids.reshape(-1)
        routings: list[Routing] = []
        for layer in self.layers:
            x, routing = layer(x, cos, sin, token_ids)
            if routing is not None:
                routings.append(routing)
        logits = self.lm_head(self.norm(x))
        out = LMOutput(logits=logits, routings=routings)
        if labels is not None:
            rc = cfg.moe.router
            out.ce_loss = F.cross_entropy(
                logits.float().view(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100
            )
            zero = out.ce_loss.new_zeros(())
            out.aux_loss = torch.stack([r.aux_loss for r in routings]).mean() if routings else zero
            out.z_loss = torch.stack([r.z_loss for r in routings]).mean() if routings else zero
            out.loss = out.ce_loss + rc.aux_loss_coef * out.aux_loss + rc.z_loss_coef * out.z_loss
            ent = [r.entropy_loss for r in routings if r.entropy_loss is not None]
            if ent:
                out.entropy_loss = torch.stack(ent).mean()
                if rc.entropy_loss_coef:
                    out.loss = out.loss + rc.entropy_loss_coef * out.entropy_loss
        return out
