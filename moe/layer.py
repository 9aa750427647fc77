"""The MoE layer: router -> dispatch -> experts -> weighted combine (+ shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from kernels import sort_by_expert
from kernels.device import autocast_dtype
from moe.config import MoEConfig
from moe.experts import Experts
from moe.mlp import MLP
from routing import Routing, build_router


class SharedExperts(nn.Module):
    """x [T, d] -> [T, d]: one dense MLP every token takes, optionally sigmoid-gated."""

    def __init__(self, d_model: int, ffn: int, kind: str, gated: bool):
        super().__init__()
        self.mlp = MLP(d_model, ffn, kind)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class LocalDispatch(nn.Module):
    """Tokens and experts on one device: sort by expert, grouped GEMMs, weighted combine.
    The experts module (`Experts`, or FSSDP's) takes (x, d, combine_weights=) and combines.

    `parallel/` swaps this for a dispatcher that moves tokens between ranks; the layer itself
    never sees a process group.
    """

    def forward(self, x: torch.Tensor, routing: Routing, experts: nn.Module,
                may_drop: bool, backend: str) -> torch.Tensor:
        """x [T, d], routing -> [T, d] = sum over kept slots of weight * expert(x)."""
        dropped = routing.dropped if may_drop else None
        d = sort_by_expert(routing.expert_ids, routing.num_experts, dropped, backend)
        # the experts combine their outputs themselves (SwiGLU ones keep no y for the backward)
        return experts(x, d, combine_weights=routing.combine_weights)


class MoELayer(nn.Module):
    """x [B, S, d] or [T, d] -> (out of the same shape, Routing).

    Drop-free or capacity-limited as the router config says; dropped slots contribute nothing
    (the residual connection around the layer carries those tokens).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, vocab_size: int | None = None):
        super().__init__()
        cfg.check()
        self.cfg, self.d_model = cfg, d_model
        self.router = build_router(cfg.router, d_model, cfg.num_experts, vocab_size,
                                   cfg.kernel_backend)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_ffn, cfg.expert_type,
                               cfg.kernel_backend, cfg.expert_bias, cfg.swiglu_alpha,
                               cfg.swiglu_limit)
        self.shared = None
        if cfg.num_shared_experts > 0:
            ffn = cfg.shared_expert_ffn or cfg.num_shared_experts * cfg.expert_ffn
            self.shared = SharedExperts(d_model, ffn, cfg.expert_type, cfg.shared_expert_gate)
        self.dispatch = LocalDispatch()

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing]:
        if not torch.is_floating_point(x):
            raise ValueError(f"MoE layer input must be floating point, got dtype {x.dtype}")
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"hidden size {x.shape[-1]} does not match the layer's d_model={self.d_model}"
            )
        amp = autocast_dtype(x)
        if x.dtype != self.experts.dtype and amp is None:
            raise ValueError(
                f"input dtype {x.dtype} does not match the expert weights' {self.experts.dtype}"
            )
        seq_len = x.shape[-2] if x.dim() == 3 else None
        flat = x.reshape(-1, self.d_model)
        if amp is not None:  # mixed precision: tokens travel and meet the experts in amp
            flat = flat.to(amp)
        routing = self.router(flat, token_ids, seq_len)
        out = self.dispatch(flat, routing, self.experts, self.router.may_drop,
                            self.cfg.kernel_backend)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(x.shape), routing
