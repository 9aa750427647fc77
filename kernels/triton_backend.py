"""Triton backend: the same primitives as kernels/reference.py, on CUDA (or the interpreter)."""

from kernels.triton.combine import combine_grad_rows, weighted_combine, weighted_combine_backward
from kernels.triton.grouped_mm import (
    group_weight_grad,
    scatter2scatter,
    scatter2scatter_quant,
    scatter2scatter_swiglu,
    scatter2scatter_swiglu_bwd,
    scatter2scatter_swiglu_bwd_combined,
)
from kernels.triton.router_loss import router_losses_bwd, router_losses_fwd
from kernels.triton.routing import sort_pairs, topk_route_bwd, topk_route_fwd
from kernels.triton.swiglu import swiglu_bwd, swiglu_fwd

__all__ = [
    "combine_grad_rows",
    "group_weight_grad",
    "router_losses_bwd",
    "router_losses_fwd",
    "scatter2scatter",
    "scatter2scatter_quant",
    "scatter2scatter_swiglu",
    "scatter2scatter_swiglu_bwd",
    "scatter2scatter_swiglu_bwd_combined",
    "sort_pairs",
    "swiglu_bwd",
    "swiglu_fwd",
    "topk_route_bwd",
    "topk_route_fwd",
    "weighted_combine",
    "weighted_combine_backward",
]
