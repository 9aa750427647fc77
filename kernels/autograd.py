"""autograd.Functions over a backend's grouped primitives (reference or Triton)."""

from __future__ import annotations

from types import ModuleType

import torch

from kernels.dispatch import Dispatch


class GroupedLinear(torch.autograd.Function):
    """y [M, d_out] = per-row x_row(n) @ w[e_n]^T; see kernels/reference.py for the orders."""

    @staticmethod
    def forward(ctx, x, w, d: Dispatch, x_grouped: bool, y_grouped: bool, backend: ModuleType):
        fan_out = 1 if x_grouped else d.top_k
        y = backend.scatter2scatter(x, w, d, x_grouped, y_grouped, fan_out)
        ctx.save_for_backward(x, w)
        ctx.meta = (d, x_grouped, y_grouped, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        d, x_grouped, y_grouped, backend = ctx.meta
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            wt = w.transpose(1, 2)
            if x_grouped:
                dx = backend.scatter2scatter(dy, wt, d, y_grouped, True, 1)
            else:
                # One row per slot, then the k slots of a token summed.
                dx = backend.scatter2scatter(dy, wt, d, y_grouped, False, 1)
                dx = dx.view(d.num_tokens, d.top_k, w.shape[2]).sum(1)
        if ctx.needs_input_grad[1]:
            fan_out = 1 if x_grouped else d.top_k
            dw = backend.group_weight_grad(x, dy, d, x_grouped, fan_out, y_grouped)
        return dx, dw, None, None, None, None


def _swiglu_mlp(x, w_in, w_out, d: Dispatch, y_grouped: bool, backend: ModuleType):
    """The forward of the SwiGLU experts -> (rows: the kept rows' bound or None, h, a, y)."""
    rows = d.expert_offsets[-1:] if d.may_drop else None  # the dropped rows are skipped
    h, a = backend.scatter2scatter_swiglu(x, w_in, d, False, d.top_k, rows)
    return rows, h, a, backend.scatter2scatter(a, w_out, d, True, y_grouped, 1)


def _up_projection_grads(x, w_in, dh, d: Dispatch, need_x: bool, need_in: bool,
                         backend: ModuleType):
    """dh [M, 2F] grouped -> (dx [T, d] or None, dw_in or None) of the up projection."""
    dx = dw_in = None
    if need_x:  # one row per slot, then the k slots of a token summed
        dx = backend.scatter2scatter(dh, w_in.transpose(1, 2), d, True, False, 1)
        dx = dx.view(d.num_tokens, d.top_k, w_in.shape[2]).sum(1)
    if need_in:
        dw_in = backend.group_weight_grad(x, dh, d, False, d.top_k, True)
    return dx, dw_in


class SwiGLUExperts(torch.autograd.Function):
    """x [T, d] (token order), w_in [E, 2F, d] (gate; up), w_out [E, d, F] -> y [M, d]
    (grouped, or slot order): up projection, SwiGLU, down projection, with the SwiGLU in the
    epilogues of the up projection (forward) and of the down projection's input gradient
    (backward) where the backend fuses them. Saves x, h and a, as the three separate
    functions would; keep_a=False: not a, recomputed from h for w_out's gradient (one SwiGLU
    kernel in the backward for M x F fewer elements kept)."""

    @staticmethod
    def forward(ctx, x, w_in, w_out, d: Dispatch, y_grouped: bool, backend: ModuleType,
                keep_a: bool = True):
        rows, h, a, y = _swiglu_mlp(x, w_in, w_out, d, y_grouped, backend)
        ctx.save_for_backward(x, w_in, w_out, h, a if keep_a else None)
        ctx.meta = (d, y_grouped, rows, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_in, w_out, h, a = ctx.saved_tensors
        d, y_grouped, rows, backend = ctx.meta
        dy = dy.contiguous()
        need_x, need_in, need_out = ctx.needs_input_grad[:3]
        dx = dw_in = dw_out = None
        if need_x or need_in:
            dh = backend.scatter2scatter_swiglu_bwd(dy, w_out.transpose(1, 2), h, d,
                                                    y_grouped, rows)
        if need_out:
            a = backend.swiglu_fwd(h, rows) if a is None else a
            dw_out = backend.group_weight_grad(a, dy, d, True, 1, y_grouped)
        if need_x or need_in:
            dx, dw_in = _up_projection_grads(x, w_in, dh, d, need_x, need_in, backend)
        return dx, dw_in, dw_out, None, None, None, None


class SwiGLUExpertsCombined(torch.autograd.Function):
    """x [T, d] (token order), w_in [E, 2F, d], w_out [E, d, F], weights [T, k] -> out [T, d]
    = sum over a token's kept slots of weight * expert(x): SwiGLUExperts then the weighted
    combine, without keeping the expert outputs y [M, d] for the backward (it saves x, h, a
    and the weights): the weights' gradient, dout . y per pair, is computed as
    (dout @ w_out) . a in the epilogue of the GEMM that also gives dh (the backend's
    scatter2scatter_swiglu_bwd_combined), which reads dout in token order. keep_a=False: a
    is recomputed from h for w_out's gradient, as in SwiGLUExperts."""

    @staticmethod
    def forward(ctx, x, w_in, w_out, weights, d: Dispatch, backend: ModuleType,
                keep_a: bool = True):
        rows, h, a, y = _swiglu_mlp(x, w_in, w_out, d, True, backend)
        ctx.save_for_backward(x, w_in, w_out, weights, h, a if keep_a else None)
        ctx.meta = (d, rows, backend)
        return backend.weighted_combine(y, weights, d, True)

    @staticmethod
    def backward(ctx, dout):
        x, w_in, w_out, weights, h, a = ctx.saved_tensors
        d, rows, backend = ctx.meta
        dout = dout.contiguous()
        need_x, need_in, need_out, need_w = ctx.needs_input_grad[:4]
        dx = dw_in = dw_out = dweights = None
        if need_x or need_in or need_w:
            dh, dweights = backend.scatter2scatter_swiglu_bwd_combined(
                dout, w_out.transpose(1, 2), h, weights, d, rows)
            dweights = dweights.to(weights.dtype) if need_w else None
        if need_out:
            a = backend.swiglu_fwd(h, rows) if a is None else a
            dw_out = backend.group_weight_grad(a, backend.combine_grad_rows(dout, weights, d),
                                               d, True, 1, True)
        if need_x or need_in:
            dx, dw_in = _up_projection_grads(x, w_in, dh, d, need_x, need_in, backend)
        return dx, dw_in, dw_out, dweights, None, None, None


class WeightedCombine(torch.autograd.Function):
    """out [T, d] = sum over a token's kept slots of weight * y_row; grads to y and weights.
    Keeps y for the backward only for the weights' gradient (or for y in slot order)."""

    @staticmethod
    def forward(ctx, y, weights, d: Dispatch, y_grouped: bool, backend: ModuleType):
        rows_only = y_grouped and not ctx.needs_input_grad[1]
        ctx.save_for_backward(None if rows_only else y, weights)
        ctx.meta = (d, y_grouped, backend)
        return backend.weighted_combine(y, weights, d, y_grouped)

    @staticmethod
    def backward(ctx, dout):
        y, weights = ctx.saved_tensors
        d, y_grouped, backend = ctx.meta
        if y is None:  # the weights need no gradient: dy rows only, y not read
            return backend.combine_grad_rows(dout.contiguous(), weights, d), None, None, \
                None, None
        dy, dweights = backend.weighted_combine_backward(
            dout.contiguous(), y, weights, d, y_grouped
        )
        return dy, dweights, None, None, None


class SwiGLU(torch.autograd.Function):
    """h [M, 2F] (gate; up) -> silu(gate) * up [M, F]; saves h only."""

    @staticmethod
    def forward(ctx, h, backend: ModuleType, rows: torch.Tensor | None = None):
        ctx.save_for_backward(h)
        ctx.backend, ctx.rows = backend, rows
        return backend.swiglu_fwd(h, rows)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        return ctx.backend.swiglu_bwd(h, da.contiguous(), ctx.rows), None, None


class TopKRoute(torch.autograd.Function):
    """logits [T, E] -> (expert_ids [T, k], weights [T, k]); gradients flow to the logits
    through the weights (the selection, group-limited or not, is piecewise constant)."""

    @staticmethod
    def forward(ctx, logits, bias, k: int, sigmoid: bool, renormalize: bool, scale: float,
                backend: ModuleType, groups: tuple[int, int, bool] | None = None):
        ids, w = backend.topk_route_fwd(logits, bias, k, sigmoid, renormalize, scale, groups)
        ctx.save_for_backward(logits, ids, w)
        ctx.meta = (sigmoid, renormalize, scale, backend)
        ctx.mark_non_differentiable(ids)
        ctx.set_materialize_grads(False)  # no zeros launched for the ids' gradient
        return ids, w

    @staticmethod
    def backward(ctx, _dids, dw):
        if dw is None:
            return (None,) * 8
        logits, ids, w = ctx.saved_tensors
        sigmoid, renormalize, scale, backend = ctx.meta
        dl = backend.topk_route_bwd(logits, ids, w, dw, sigmoid, renormalize, scale)
        return dl, None, None, None, None, None, None, None


class RouterLosses(torch.autograd.Function):
    """logits [T, E], expert_ids [T, k] -> (aux, z, entropy) scalars, differentiable in the
    logits (the selection counts held fixed), and the counts [E] int64; saves the logits and
    each sequence's counts."""

    @staticmethod
    def forward(ctx, logits, ids, sigmoid: bool, entropy: bool, seq_len: int | None,
                backend: ModuleType):
        aux, z, ent, counts, seq_counts = backend.router_losses_fwd(logits, ids, sigmoid,
                                                                    entropy, seq_len)
        ctx.save_for_backward(logits, seq_counts)
        ctx.meta = (ids.shape[1], sigmoid, entropy, backend)
        ctx.mark_non_differentiable(counts)
        ctx.set_materialize_grads(False)  # a loss left out of the objective costs no zeros
        return aux, z, ent, counts

    @staticmethod
    def backward(ctx, daux, dz, dent, _dcounts):
        logits, seq_counts = ctx.saved_tensors
        k, sigmoid, entropy, backend = ctx.meta
        used = [g for g in (daux, dz, dent) if g is not None]
        if not used:
            return None, None, None, None, None, None
        if daux is None or dz is None:
            zero = torch.zeros_like(used[0])
            daux, dz = (zero if g is None else g for g in (daux, dz))
        if dent is None:  # its term is left out (and dent not read)
            dent, entropy = daux, False
        dl = backend.router_losses_bwd(logits, seq_counts, k, daux, dz, dent, sigmoid,
                                       entropy)
        return dl, None, None, None, None, None
