"""Routed experts with stacked weights, computed by grouped GEMMs over a `Dispatch`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import Dispatch, grouped_linear, swiglu, swiglu_experts, weighted_combine
from kernels.device import autocast_dtype
from kernels.quant import QuantWeight
from moe.mlp import ACTIVATIONS, clamped_swiglu, input_width

EXPERT_PARAMS = ("w_in", "w_out", "b_in", "b_out")  # the stacked [E, ...] parameters


class Experts(nn.Module):
    """E expert MLPs. w_in [E, 2F | F, d] (gate; up for the gated kinds), w_out [E, d, F];
    with bias, b_in [E, 2F | F] and b_out [E, d] (GPT-OSS)."""

    def __init__(self, num_experts: int, d_model: int, ffn: int, kind: str = "swiglu",
                 backend: str = "auto", bias: bool = False, alpha: float = 1.702,
                 limit: float = 7.0):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert type must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
        self.kind, self.backend = kind, backend
        self.alpha, self.limit = alpha, limit  # clamped_swiglu only
        # recompute the SwiGLU activation in the backward instead of keeping it
        # (activation checkpointing "moe_act"; bias-free SwiGLU experts)
        self.recompute_act = False
        self.num_experts, self.d_model, self.ffn = num_experts, d_model, ffn
        self.w_in = nn.Parameter(torch.empty(num_experts, input_width(kind, ffn), d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, ffn))
        self.b_in = nn.Parameter(torch.empty(num_experts, input_width(kind, ffn))) if bias \
            else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal with std 1/sqrt(fan_in), as each expert were an nn.Linear pair; zero
        biases."""
        nn.init.normal_(self.w_in, std=self.d_model**-0.5)
        nn.init.normal_(self.w_out, std=self.ffn**-0.5)
        for b in (self.b_in, self.b_out):
            if b is not None:
                b.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    def forward(self, x: torch.Tensor, d: Dispatch, y_grouped: bool = True,
                combine_weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d] token order -> y [M, d] in Dispatch order (or slot order t * k + j); with
        combine_weights [T, k] -> [T, d] = sum over a token's kept slots of weight * y, which
        SwiGLU experts without biases compute without keeping y for the backward. Every
        experts module that `moe.layer.LocalDispatch` is given takes these arguments."""
        return expert_mlp(x, self.w_in, self.w_out, d, self.kind, self.backend, y_grouped,
                          self.b_in, self.b_out, self.alpha, self.limit, self.recompute_act,
                          combine_weights)


def _autocast(*tensors):
    """Under torch.autocast, its dtype for every floating-point tensor of `tensors` (the
    casts are in the graph: float32 weights get float32 gradients); else them as they are."""
    amp = autocast_dtype(tensors[0])
    if amp is None:
        return tensors
    return tuple(t.to(amp) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


def _row_bias(b: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """b [E, n] -> [M, n]: each Dispatch-order row's expert bias (zero for dropped rows)."""
    return torch.cat([b, b.new_zeros(1, b.shape[1])])[d.sorted_expert_idx]


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, d: Dispatch,
               kind: str, backend: str, y_grouped: bool = True,
               b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
               alpha: float = 1.702, limit: float = 7.0, recompute_act: bool = False,
               combine_weights: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, d], w_in [E, 2F | F, d], w_out [E, d, F] (biases b_in [E, 2F | F], b_out
    [E, d] or None) -> y [M, d] (Dispatch or slot order); alpha / limit: clamped_swiglu's;
    recompute_act: bias-free SwiGLU experts keep no activation a for the backward but
    recompute it there. With combine_weights [T, k]: -> [T, d] = sum over a token's kept
    slots of weight * y (y_grouped aside), which bias-free, unquantized SwiGLU experts
    compute in their grouped GEMMs without keeping y for the backward; the others combine y
    afterwards. Under torch.autocast, x and the weights are cast to its dtype first (the
    casts are in the graph: float32 weights get float32 gradients)."""
    x, w_in, w_out, b_in, b_out = _autocast(x, w_in, w_out, b_in, b_out)
    if kind == "swiglu" and b_in is None and b_out is None \
            and not isinstance(w_in, QuantWeight) and not isinstance(w_out, QuantWeight):
        # the SwiGLU (and the combine) in the grouped GEMMs' epilogues
        return swiglu_experts(x, w_in, w_out, d, y_grouped, backend, combine_weights,
                              recompute_act)
    if combine_weights is None:
        return _unfused_mlp(x, w_in, w_out, d, kind, backend, y_grouped, b_in, b_out, alpha,
                            limit)
    y = _unfused_mlp(x, w_in, w_out, d, kind, backend, True, b_in, b_out, alpha, limit)
    return weighted_combine(y, combine_weights, d, True, backend)


def _unfused_mlp(x, w_in, w_out, d: Dispatch, kind: str, backend: str, y_grouped: bool,
                 b_in, b_out, alpha: float, limit: float) -> torch.Tensor:
    """expert_mlp with the activation and biases apart from the grouped GEMMs -> y [M, d]."""
    h = grouped_linear(x, w_in, d, x_grouped=False, y_grouped=True, backend=backend)
    if b_in is not None:
        h = h + _row_bias(b_in, d).to(h.dtype)
    if kind == "swiglu":  # the dropped pairs' rows (after the kept ones) are skipped
        a = swiglu(h, backend, d.expert_offsets[-1:] if d.may_drop else None)
    elif kind == "clamped_swiglu":
        a = clamped_swiglu(h, alpha, limit)
    else:
        a = F.gelu(h)
    if b_out is None:
        return grouped_linear(a, w_out, d, x_grouped=True, y_grouped=y_grouped, backend=backend)
    y = grouped_linear(a, w_out, d, x_grouped=True, y_grouped=True, backend=backend)
    y = y + _row_bias(b_out, d).to(y.dtype)
    if y_grouped:
        return y
    return y.new_zeros(y.shape).index_copy(0, d.sorted_pair_idx, y)  # slot order
