"""Dense MLPs (the dense layers of the LM and the shared experts) and expert activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2F] (gate; up) -> [..., F] = silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def clamped_swiglu(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """h [..., 2F] (gate; up) -> [..., F] = (up' + 1) * g * sigmoid(alpha * g) with
    g = min(gate, limit), up' = clamp(up, -limit, limit): GPT-OSS's expert activation."""
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


ACTIVATIONS = {"swiglu": swiglu, "gelu": F.gelu, "clamped_swiglu": clamped_swiglu}


def input_width(kind: str, ffn: int) -> int:
    """Rows of the first projection: 2F for the gated kinds (gate and up fused), F for gelu."""
    return ffn if kind == "gelu" else 2 * ffn


class MLP(nn.Module):
    """x [..., d] -> [..., d]. SwiGLU (gate_up fused, as HF's experts) or GELU."""

    def __init__(self, d_model: int, ffn: int, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        self.w_in = nn.Linear(d_model, input_width(kind, ffn), bias=False)
        self.w_out = nn.Linear(ffn, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(ACTIVATIONS[self.kind](self.w_in(x)))
