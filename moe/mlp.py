"""Dense MLPs (the dense layers of the LM and the shared experts) and expert activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2F] (gate; up) -> [..., F] = silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS = {"swiglu": swiglu, "gelu": F.gelu}


def input_width(kind: str, ffn: int) -> int:
    """Rows of the first projection: 2F for swiglu (gate and up fused), F for gelu."""
    return 2 * ffn if kind == "swiglu" else ffn


class MLP(nn.Module):
    """x [..., d] -> [..., d]. SwiGLU (gate_up fused, as HF's experts) or GELU."""

    def __init__(self, d_model: int, ffn: int, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        self.w_in = nn.Linear(d_model, input_width(kind, ffn), bias=False)
        self.w_out = nn.Linear(ffn, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(ACTIVATIONS[self.kind](self.w_in(x)))
