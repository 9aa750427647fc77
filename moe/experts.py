"""Routed experts with stacked weights, computed by grouped GEMMs over a `Dispatch`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import Dispatch, grouped_linear, swiglu
from moe.mlp import ACTIVATIONS, input_width


class Experts(nn.Module):
    """E expert MLPs. w_in [E, 2F | F, d] (gate; up for swiglu), w_out [E, d, F]."""

    def __init__(self, num_experts: int, d_model: int, ffn: int, kind: str = "swiglu",
                 backend: str = "auto"):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert type must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
        self.kind, self.backend = kind, backend
        self.num_experts, self.d_model, self.ffn = num_experts, d_model, ffn
        self.w_in = nn.Parameter(torch.empty(num_experts, input_width(kind, ffn), d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, ffn))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal with std 1/sqrt(fan_in), as each expert were an nn.Linear pair."""
        nn.init.normal_(self.w_in, std=self.d_model**-0.5)
        nn.init.normal_(self.w_out, std=self.ffn**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    def forward(self, x: torch.Tensor, d: Dispatch, y_grouped: bool = True) -> torch.Tensor:
        """x [T, d] token order -> y [M, d] in Dispatch order (or slot order t * k + j)."""
        return expert_mlp(x, self.w_in, self.w_out, d, self.kind, self.backend, y_grouped)


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, d: Dispatch,
               kind: str, backend: str, y_grouped: bool = True) -> torch.Tensor:
    """x [T, d], w_in [E, 2F | F, d], w_out [E, d, F] -> y [M, d] (Dispatch or slot order)."""
    h = grouped_linear(x, w_in, d, x_grouped=False, y_grouped=True, backend=backend)
    a = swiglu(h, backend) if kind == "swiglu" else F.gelu(h)
    return grouped_linear(a, w_out, d, x_grouped=True, y_grouped=y_grouped, backend=backend)
