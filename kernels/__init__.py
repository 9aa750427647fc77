"""Scatter/gather grouped-GEMM ops behind one function API.

x [T, d] --sort_by_expert--> Dispatch --grouped_linear--> y [M, d_out] (expert-contiguous)
--weighted_combine--> [T, d_out]. Backends: "torch" (reference, CPU) and "triton" (CUDA).
"""

from __future__ import annotations

import torch

from kernels.autograd import (
    GroupedLinear,
    RouterLosses,
    SwiGLU,
    SwiGLUExperts,
    SwiGLUExpertsCombined,
    TopKRoute,
    WeightedCombine,
)
from kernels.backend import get_backend
from kernels.dispatch import Dispatch, sort_by_expert
from kernels.quant import QuantWeight


def grouped_linear(
    x: torch.Tensor,
    w: torch.Tensor | QuantWeight,
    d: Dispatch,
    x_grouped: bool = False,
    y_grouped: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """x [T, d_in] (token order) or [M, d_in] (grouped), w [E, d_out, d_in] -> y [M, d_out].

    Row n of the output (Dispatch order if y_grouped, else slot order t * k + j) is the input
    row of pair n times its expert's weight transposed; dropped pairs give zero rows.
    w may be a `QuantWeight` stack (int8 / int4, inference only): it is dequantized inside
    the GEMM (Triton) or one expert at a time (torch).
    """
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"input size {x.shape[-1]} does not match the weight's d_in={w.shape[-1]}")
    if w.shape[0] != d.num_experts:
        raise ValueError(f"weight has {w.shape[0]} experts, dispatch has {d.num_experts}")
    be = get_backend(backend, x.device)
    if isinstance(w, QuantWeight):
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("quantized expert weights are for inference: run under "
                             "torch.no_grad() (no gradient flows through them)")
        return be.scatter2scatter_quant(x, w, d, x_grouped, y_grouped,
                                        1 if x_grouped else d.top_k)
    return GroupedLinear.apply(x, w, d, x_grouped, y_grouped, be)


def swiglu_experts(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    d: Dispatch,
    y_grouped: bool = True,
    backend: str = "auto",
    weights: torch.Tensor | None = None,
    recompute_act: bool = False,
) -> torch.Tensor:
    """x [T, d] (token order), w_in [E, 2F, d] (gate; up), w_out [E, d, F] -> y [M, d]:
    grouped_linear(swiglu(grouped_linear(x, w_in)), w_out), in Dispatch order (or slot
    order), the SwiGLU fused into the grouped GEMMs where the backend can (Triton). With
    weights [T, k]: -> [T, d], y combined as weighted_combine(y, weights, d) would, and y not
    kept for the backward (SwiGLUExpertsCombined). recompute_act: the activation a [M, F] is
    not kept either, but recomputed from h in the backward."""
    _check_swiglu_experts(x, w_in, w_out, d)
    be = get_backend(backend, x.device)
    if weights is None:
        return SwiGLUExperts.apply(x, w_in, w_out, d, y_grouped, be, not recompute_act)
    if weights.shape != (d.num_tokens, d.top_k):
        raise ValueError(f"combine weights {tuple(weights.shape)} do not match the dispatch's "
                         f"[{d.num_tokens}, {d.top_k}]")
    return SwiGLUExpertsCombined.apply(x, w_in, w_out, weights, d, be, not recompute_act)


def _check_swiglu_experts(x, w_in, w_out, d: Dispatch) -> None:
    if w_in.dim() != 3 or w_out.dim() != 3:
        raise ValueError(f"need w_in [E, 2F, d] and w_out [E, d, F], got "
                         f"{tuple(w_in.shape)} and {tuple(w_out.shape)}")
    E, two_f, d_in = w_in.shape
    if two_f % 2 or w_out.shape != (E, d_in, two_f // 2):
        raise ValueError(f"need w_in [E, 2F, d] and w_out [E, d, F], got "
                         f"{tuple(w_in.shape)} and {tuple(w_out.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"input size {x.shape[-1]} does not match the weight's d_in={d_in}")
    if E != d.num_experts:
        raise ValueError(f"weight has {E} experts, dispatch has {d.num_experts}")


def weighted_combine(
    y: torch.Tensor,
    weights: torch.Tensor,
    d: Dispatch,
    y_grouped: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """y [M, d_out], weights [T, k] -> out [T, d_out] = sum_j weights[t, j] * y_row(t, j)."""
    return WeightedCombine.apply(y, weights, d, y_grouped, get_backend(backend, y.device))


def swiglu(h: torch.Tensor, backend: str = "auto", rows: torch.Tensor | None = None
           ) -> torch.Tensor:
    """h [M, 2F] (gate; up) -> [M, F] = silu(gate) * up. rows ([1] int64, on h's device,
    e.g. a Dispatch's expert_offsets[-1:]): only the first rows[0] rows matter; the Triton
    kernels skip the others (dropped pairs), whose values are then undefined."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension (gate; up), got {h.shape[-1]}")
    return SwiGLU.apply(h, get_backend(backend, h.device), rows)


def topk_route(logits: torch.Tensor, k: int, score: str = "softmax", renormalize: bool = True,
               scale: float = 1.0, bias: torch.Tensor | None = None, backend: str = "auto",
               groups: tuple[int, int, bool] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> expert_ids [T, k] int64 (best first), weights [T, k] float32.

    score "softmax" or "sigmoid"; bias [E] shifts only the selection; renormalize divides the
    k weights by their sum; scale multiplies them. groups (n_group, topk_group, top2):
    group-limited selection (DeepSeek-V2 / V3): the E experts form n_group equal groups, and
    the k come from each token's topk_group best groups, a group scored by its best biased
    score (or, top2, the sum of its two best). Differentiable in the logits.
    """
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be softmax or sigmoid, got {score!r}")
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"need logits [T, E] and 1 <= k <= E, got {tuple(logits.shape)}, k={k}")
    if groups is not None:
        n_group, topk_group, top2 = groups
        per = logits.shape[1] // n_group if n_group > 0 else 0
        if n_group < 1 or logits.shape[1] % n_group or not 1 <= topk_group <= n_group \
                or k > topk_group * per or (top2 and per < 2):
            raise ValueError(f"groups {groups} do not fit E={logits.shape[1]} experts and k={k}")
    return TopKRoute.apply(logits, bias, k, score == "sigmoid", renormalize, scale,
                           get_backend(backend, logits.device), groups)


def router_losses(logits: torch.Tensor, expert_ids: torch.Tensor, score: str = "softmax",
                  entropy: bool = False, backend: str = "auto", seq_len: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E], expert_ids [T, k] -> (aux, z, entropy, counts): 0-dim losses of a
    token-choice router (float32; float64 for float64 logits), differentiable in the logits,
    and each expert's selected slots [E] int64.

    aux: the Switch load-balancing loss over the batch, E * sum_e f_e P_e with f_e the share
    of the T * k slots that chose e and P_e the mean probability of e (softmax, or for score
    "sigmoid" the sigmoid scores over their row sum); with seq_len, f and P are taken per
    sequence of seq_len consecutive tokens and the loss averaged over sequences (DeepSeek-V3's
    sequence-wise balance loss); z: mean logsumexp(logits)^2; entropy:
    the mean entropy of the softmax (0 unless asked). The same values as routing.losses'
    switch_aux_loss, router_z_loss and router_entropy, in three kernels on the Triton backend.
    """
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be softmax or sigmoid, got {score!r}")
    if logits.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"need logits [T, E] and expert_ids [T, k], got {tuple(logits.shape)} "
                         f"and {tuple(expert_ids.shape)}")
    T = logits.shape[0]
    if seq_len is not None and (seq_len < 1 or T % seq_len):
        raise ValueError(f"{T} tokens do not split into sequences of length {seq_len}")
    return RouterLosses.apply(logits, expert_ids, score == "sigmoid", entropy,
                              None if seq_len == T else seq_len,
                              get_backend(backend, logits.device))


__all__ = ["Dispatch", "grouped_linear", "router_losses", "sort_by_expert", "swiglu",
           "swiglu_experts", "topk_route", "weighted_combine"]


def without_host_waits():
    """A context manager: within it, the Triton backend's grouped GEMMs pick among the
    implementations that never wait for the device (not the per-expert loop, which reads
    the rows per expert back): for CUDA graph capture, and for serving, whose host must keep
    issuing the next layer's work while expert copies run."""
    from kernels.triton import pick

    return pick.without_host_waits()
