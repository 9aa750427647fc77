"""Pure-torch backend of the grouped ops: the oracle for the Triton kernels, and the CPU path.

Index conventions (shared with every backend):
  an input "grouped" has M = T * k rows in `Dispatch` order; otherwise sorted row n reads row
  ``sorted_pair_idx[n] // fan_out`` (fan_out = k for token order [T, d], 1 for slot order
  [T * k, d]). An output "grouped" is written in Dispatch order, otherwise in slot order.
  Rows of dropped pairs are never read; in outputs they are zero.
"""

from __future__ import annotations

import torch

from kernels.dispatch import Dispatch
from kernels.quant import QuantWeight, dequantize


def _host_counts(d: Dispatch) -> list[int]:
    """Rows per expert [E] on the host: one device sync per Dispatch, shared by its ops."""
    if "host_counts" not in d.cache:
        d.cache["host_counts"] = d.tokens_per_expert.tolist()
    return d.cache["host_counts"]


def _kept(d: Dispatch) -> int:
    return sum(_host_counts(d))


def sorted_rows(x: torch.Tensor, d: Dispatch, grouped: bool, fan_out: int, n: int
                ) -> torch.Tensor:
    """The first n sorted rows of x, in Dispatch order."""
    if grouped:
        return x[:n]
    if fan_out == d.top_k:  # token order
        return x.index_select(0, d.sorted_token_idx[:n])
    return x.index_select(0, d.sorted_pair_idx[:n] // fan_out)


def scatter2scatter(
    x: torch.Tensor,
    w: torch.Tensor,
    d: Dispatch,
    x_grouped: bool,
    y_grouped: bool,
    fan_out: int,
) -> torch.Tensor:
    """x [T or M, d_in], w [E, d_out, d_in] -> y [M, d_out]: row n = x_row(n) @ w[e_n]^T."""
    return _scatter2scatter(x, lambda e: w[e], w.shape[1], d, x_grouped, y_grouped, fan_out)


def scatter2scatter_quant(
    x: torch.Tensor,
    wq: QuantWeight,
    d: Dispatch,
    x_grouped: bool,
    y_grouped: bool,
    fan_out: int,
) -> torch.Tensor:
    """scatter2scatter with int8 / int4 weights wq [E, d_out, d_in]: each expert that has rows
    is dequantized to x.dtype when its rows are computed (inference; no gradient)."""
    return _scatter2scatter(x, lambda e: dequantize(wq[e], x.dtype), wq.shape[1], d,
                            x_grouped, y_grouped, fan_out)


def _scatter2scatter(x, weight, d_out: int, d: Dispatch, x_grouped: bool, y_grouped: bool,
                     fan_out: int) -> torch.Tensor:
    """weight(e) -> expert e's [d_out, d_in] matrix, asked for only for experts with rows."""
    n = _kept(d)
    xs = sorted_rows(x, d, x_grouped, fan_out, n)
    alloc = torch.empty if n == d.num_pairs else torch.zeros  # dropped rows read as zeros
    y = alloc(d.num_pairs, d_out, dtype=x.dtype, device=x.device)
    ys = y[:n] if y_grouped else torch.empty(n, d_out, dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(_host_counts(d)):
        if c:
            torch.mm(xs[start : start + c], weight(e).t(), out=ys[start : start + c])
        start += c
    if not y_grouped:
        y[d.sorted_pair_idx[:n]] = ys
    return y


def group_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    d: Dispatch,
    x_grouped: bool,
    x_fan_out: int,
    dy_grouped: bool,
) -> torch.Tensor:
    """x rows [., d_in], dy rows [., d_out] -> dw [E, d_out, d_in] = sum_n dy_n^T x_n per expert."""
    n = _kept(d)
    xs = sorted_rows(x, d, x_grouped, x_fan_out, n)
    dys = sorted_rows(dy, d, dy_grouped, 1, n)
    dw = torch.empty(d.num_experts, dy.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(_host_counts(d)):
        if c:
            torch.mm(dys[start : start + c].t(), xs[start : start + c], out=dw[e])
        else:
            dw[e].zero_()
        start += c
    return dw


def weighted_combine(
    y: torch.Tensor, weights: torch.Tensor, d: Dispatch, y_grouped: bool
) -> torch.Tensor:
    """y [M, d_out], weights [T, k] -> out [T, d_out] = sum over kept slots of w * y."""
    n = _kept(d)
    ys = sorted_rows(y, d, y_grouped, 1, n)
    w = weights.reshape(-1).index_select(0, d.sorted_pair_idx[:n]).to(y.dtype)
    out = torch.zeros(d.num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
    out.index_add_(0, d.sorted_token_idx[:n], ys * w[:, None])
    return out


def weighted_combine_backward(
    dout: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, d: Dispatch, y_grouped: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dout [T, d_out] -> (dy [M, d_out] in y's order, dweights [T, k])."""
    n = _kept(d)
    pair = d.sorted_pair_idx[:n]
    douts = dout.index_select(0, d.sorted_token_idx[:n])
    w = weights.reshape(-1).index_select(0, pair).to(dout.dtype)
    dy = torch.zeros(d.num_pairs, dout.shape[1], dtype=dout.dtype, device=dout.device)
    if y_grouped:
        dy[:n] = douts * w[:, None]
    else:
        dy[pair] = douts * w[:, None]
    ys = sorted_rows(y, d, y_grouped, 1, n)
    dw = torch.zeros(d.num_pairs, dtype=weights.dtype, device=weights.device)
    dw[pair] = (douts * ys).sum(-1).to(weights.dtype)
    return dy, dw.view_as(weights)


def swiglu_fwd(h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """h [M, 2F] (gate; up) -> a [M, F] = silu(gate) * up (every row; rows, the kept ones'
    bound, is the Triton kernels' to skip work)."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_bwd(h: torch.Tensor, da: torch.Tensor, rows: torch.Tensor | None = None
               ) -> torch.Tensor:
    """h [M, 2F], da [M, F] -> dh [M, 2F] (every row, as swiglu_fwd)."""
    gate, up = h.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    return torch.cat([da * up * s * (1 + gate * (1 - s)), da * gate * s], dim=-1)


def scatter2scatter_swiglu(x: torch.Tensor, w: torch.Tensor, d: Dispatch, x_grouped: bool,
                           fan_out: int, rows: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T or M, d_in], w [E, 2F, d_in] (gate; up) -> (h [M, 2F], a [M, F] = swiglu_fwd(h)),
    both grouped: the up projection and the SwiGLU that the Triton backend fuses."""
    h = scatter2scatter(x, w, d, x_grouped, True, fan_out)
    return h, swiglu_fwd(h, rows)


def scatter2scatter_swiglu_bwd(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor,
                               d: Dispatch, dy_grouped: bool, rows: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """dy [M, d_out] (grouped or slot order), w [E, F, d_out] (the down projection
    transposed), h [M, 2F] grouped -> dh [M, 2F] grouped = swiglu_bwd(h, dy @ w per row)."""
    return swiglu_bwd(h, scatter2scatter(dy, w, d, dy_grouped, True, 1), rows)


def swiglu_bwd_combined(da_u: torch.Tensor, h: torch.Tensor, weights: torch.Tensor,
                        d: Dispatch, rows: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """da_u [M, F] grouped (the output gradient in token order times each row's expert's
    down projection, before the combine weight), h [M, 2F], weights [T, k] -> (dh [M, 2F],
    dweights [T, k] float32): dweight = da_u . a per pair (a = silu(gate) * up, in h's
    dtype, as the forward used it), da = weight * da_u, dh = SwiGLU's backward."""
    dt = torch.promote_types(weights.dtype, torch.float32)
    keep = (d.sorted_expert_idx < d.num_experts)[:, None]  # no host sync: masks, not counts
    da_u = torch.where(keep, da_u.to(dt), 0)  # rows past the kept ones may hold anything
    part = torch.where(keep, da_u * swiglu_fwd(h, rows).to(dt), 0).sum(-1)
    dwts = torch.zeros(d.num_pairs, dtype=dt, device=h.device).index_copy_(
        0, d.sorted_pair_idx, part)
    w = weights.reshape(-1).to(dt).index_select(0, d.sorted_pair_idx)[:, None]
    return swiglu_bwd(h, (da_u * w).to(h.dtype), rows), dwts.view(d.num_tokens, d.top_k)


def scatter2scatter_swiglu_bwd_combined(dout: torch.Tensor, w: torch.Tensor, h: torch.Tensor,
                                        weights: torch.Tensor, d: Dispatch,
                                        rows: torch.Tensor | None = None
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """dout [T, d_out] (token order), w [E, F, d_out] (the down projection transposed), h
    [M, 2F] grouped, weights [T, k] -> (dh [M, 2F] grouped, dweights [T, k]): the combine's,
    the down projection's input and SwiGLU's backward without the expert outputs y (see
    swiglu_bwd_combined)."""
    da_u = scatter2scatter(dout, w, d, False, True, d.top_k)
    return swiglu_bwd_combined(da_u, h, weights, d, rows)


def combine_grad_rows(dout: torch.Tensor, weights: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """dout [T, d_out] -> [M, d_out] grouped: each kept row's weight * its token's dout (the
    combine's gradient to y, without the weights' gradient; dropped rows zero)."""
    n = _kept(d)
    w = weights.reshape(-1).index_select(0, d.sorted_pair_idx[:n]).to(dout.dtype)
    dy = torch.zeros(d.num_pairs, dout.shape[1], dtype=dout.dtype, device=dout.device)
    dy[:n] = dout.index_select(0, d.sorted_token_idx[:n]) * w[:, None]
    return dy


def sort_pairs(flat_ids: torch.Tensor, num_experts: int, top_k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat_ids [M] (E = dropped) -> sorted_pair_idx, sorted_token_idx, sorted_expert_idx
    [M] int64 (stable), expert_offsets [E + 1] int64 (offsets[E] = kept pairs), slot_rows
    [M] int64 (the sorted row of each pair: the inverse permutation)."""
    sorted_expert, pair_idx = torch.sort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    slot_rows = torch.empty_like(pair_idx)
    slot_rows[pair_idx] = torch.arange(pair_idx.numel(), device=pair_idx.device)
    return pair_idx, pair_idx // top_k, sorted_expert, offsets, slot_rows


def _scores(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Router scores [T, E]: sigmoid or softmax, in float32 (float64 for float64 logits)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.sigmoid(x) if sigmoid else torch.softmax(x, dim=-1)


def _route_weights(logits: torch.Tensor, ids: torch.Tensor, sigmoid: bool, renormalize: bool,
                   scale: float) -> torch.Tensor:
    """The combine weights [T, k] of the selected experts ids [T, k]."""
    w = _scores(logits, sigmoid).gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scale if scale != 1.0 else w


def topk_route_fwd(logits: torch.Tensor, bias: torch.Tensor | None, k: int, sigmoid: bool,
                   renormalize: bool, scale: float,
                   groups: tuple[int, int, bool] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> expert_ids [T, k] (best first), weights [T, k] float32; the bias only
    shifts the selection (DeepSeek-V3's aux-free balancing); groups: see kernels.topk_route."""
    scores = _scores(logits, sigmoid)
    select = scores if bias is None else scores + bias.to(scores.dtype)
    if groups is not None:
        select = _best_groups_only(select, *groups)
    ids = torch.topk(select, k, dim=-1).indices
    return ids, _route_weights(logits, ids, sigmoid, renormalize, scale)


def _best_groups_only(select: torch.Tensor, n_group: int, topk_group: int, top2: bool
                      ) -> torch.Tensor:
    """select [T, E] -> -inf outside each token's topk_group best of n_group equal groups
    (a group's score: its best entry, or the sum of its two best)."""
    T, E = select.shape
    grouped = select.view(T, n_group, E // n_group)
    score = grouped.topk(2, dim=-1).values.sum(-1) if top2 else grouped.max(-1).values
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(topk_group, dim=-1).indices, True)
    keep = keep[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    return select.masked_fill(~keep, float("-inf"))


def topk_route_bwd(logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                   dw: torch.Tensor, sigmoid: bool, renormalize: bool,
                   scale: float) -> torch.Tensor:
    """d(weights) [T, k] -> d(logits) [T, E], the selection held fixed."""
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        out = _route_weights(x, ids, sigmoid, renormalize, scale)
        (dl,) = torch.autograd.grad(out, x, dw.to(out.dtype))
    return dl.to(logits.dtype)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The router losses' dtype, on every backend: float64 for float64 logits, else
    float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _router_losses(logits: torch.Tensor, seq_counts: torch.Tensor, k: int, sigmoid: bool,
                   entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """aux, z, entropy of logits [T, E] (T > 0) given each sequence's selection counts
    [T / seq_len, E] (one row: the batch)."""
    x = logits.to(loss_dtype(logits))
    T, E = x.shape
    n = seq_counts.shape[0]
    p = torch.softmax(x, dim=-1)
    q = p if not sigmoid else torch.sigmoid(x) / torch.sigmoid(x).sum(-1, keepdim=True)
    mass = q.view(n, T // n, E).mean(1)  # [n, E]: mean probability per sequence
    aux = (seq_counts.to(x.dtype) * mass).sum() * (E / (T // n * k)) / n
    z = torch.logsumexp(x, dim=-1).square().mean()
    ent = -(p * torch.log(p.clamp(min=1e-20))).sum(-1).mean() if entropy else x.new_zeros(())
    return aux, z, ent


def router_losses_fwd(logits: torch.Tensor, ids: torch.Tensor, sigmoid: bool, entropy: bool,
                      seq_len: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """logits [T, E], ids [T, k] -> aux (Switch: over the batch, or per sequence of seq_len
    tokens and averaged), z, entropy (0 unless asked), the per-expert selection counts [E]
    int64 and each sequence's [T / seq_len, E]; see kernels.router_losses (float64 logits:
    float64 losses)."""
    T, E = logits.shape
    n = T // (seq_len or max(T, 1))
    seq_counts = torch.zeros(n, E, dtype=torch.int64, device=logits.device)
    seq = torch.arange(T, device=logits.device) // (seq_len or max(T, 1))
    seq_counts.view(-1).scatter_add_(0, (seq[:, None] * E + ids).reshape(-1),
                                     torch.ones_like(ids.reshape(-1)))
    counts = seq_counts.sum(0)
    if T == 0:
        zero = torch.zeros((), dtype=loss_dtype(logits), device=logits.device)
        return zero, zero.clone(), zero.clone(), counts, seq_counts
    return (*_router_losses(logits, seq_counts, ids.shape[1], sigmoid, entropy), counts,
            seq_counts)


def router_losses_bwd(logits: torch.Tensor, seq_counts: torch.Tensor, k: int,
                      daux: torch.Tensor, dz: torch.Tensor, dent: torch.Tensor, sigmoid: bool,
                      entropy: bool) -> torch.Tensor:
    """The losses' gradients (0-dim) -> d(logits) [T, E]."""
    if logits.shape[0] == 0:
        return torch.zeros_like(logits)
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        losses = _router_losses(x, seq_counts, k, sigmoid, entropy)[:3 if entropy else 2]
        (dl,) = torch.autograd.grad(losses, x, [g.to(x.dtype) for g in (daux, dz, dent)][
            :len(losses)])
    return dl.to(logits.dtype)
