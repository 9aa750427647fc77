"""Routing in fused kernels.

topk_route: router logits [T, E] -> softmax or sigmoid scores, (biased, group-limited) top-k
selection, gathered, renormalised and scaled combine weights, in one pass over each row; its
backward turns d(weights) into d(logits) in one more.

sort_pairs: the (token, slot) pairs' expert ids [M] -> stable counting sort by expert, in
three kernels: a per-block histogram, a scan of each expert's column over the blocks, and a
scatter that places every pair (and writes the expert offsets). No comparison sort, no
separate bincount / cumsum / gather launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import common


@triton.jit
def _row_scores(L, rows, cols, T, E, stride_l, SIGMOID: tl.constexpr):
    """Logit rows -> (scores [BT, EP] float32: softmax over the E valid columns, or sigmoid;
    zero outside, and that validity mask)."""
    valid = (rows < T)[:, None] & (cols < E)[None, :]
    x = tl.load(L + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=valid,
                other=0.0).to(tl.float32)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        m = tl.max(tl.where(valid, x, float("-inf")), 1)
        m = tl.where(m > float("-inf"), m, 0.0)  # rows past T: no exp(inf)
        p = tl.exp(x - m[:, None])
        p = tl.where(valid, p, 0.0)
        denom = tl.sum(p, 1)
        s = p / tl.where(denom > 0, denom, 1.0)[:, None]  # rows past T: all masked
    return tl.where(valid, s, 0.0), valid


@triton.jit
def _best_of(x, cols, E_PAD: tl.constexpr):
    """Per row of x [BT, E_PAD]: (its largest value, the lowest column holding it)."""
    best = tl.max(x, 1)
    return best, tl.min(tl.where(x == best[:, None], cols[None, :], E_PAD), 1)


@triton.jit
def _best_groups_only(sel, cols, per_group, N_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                      TOPK_GROUP: tl.constexpr, TOP2: tl.constexpr, E_PAD: tl.constexpr):
    """sel [BT, E_PAD] -> -inf outside each row's TOPK_GROUP best of N_GROUP groups of
    per_group columns; a group's score is its best entry, or (TOP2) its two best summed."""
    group = cols // per_group
    gcols = tl.arange(0, G_PAD)
    scores = tl.full((sel.shape[0], G_PAD), float("-inf"), dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        x = tl.where((group == g)[None, :], sel, float("-inf"))
        best, at = _best_of(x, cols, E_PAD)
        if TOP2:
            best += tl.max(tl.where(cols[None, :] == at[:, None], float("-inf"), x), 1)
        scores = tl.where(gcols[None, :] == g, best[:, None], scores)
    keep = tl.zeros_like(sel) != 0  # all False
    for _ in tl.static_range(TOPK_GROUP):
        _, g = _best_of(scores, gcols, G_PAD)
        keep = keep | (group[None, :] == g[:, None])
        scores = tl.where(gcols[None, :] == g[:, None], float("-inf"), scores)
    return tl.where(keep, sel, float("-inf"))


@triton.jit
def _topk_route_kernel(
    L, BIAS, IDS, W, T, E, stride_l, scale, per_group,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP2: tl.constexpr,
):
    """N_GROUP > 1: group-limited selection (see kernels.topk_route)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < T
    s, valid = _row_scores(L, rows, cols, T, E, stride_l, SIGMOID)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(BIAS + cols, mask=cols < E, other=0.0)[None, :]
    sel = tl.where(valid, sel, float("-inf"))
    if N_GROUP > 1:
        sel = _best_groups_only(sel, cols, per_group, N_GROUP, G_PAD, TOPK_GROUP, TOP2, E_PAD)
    ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for j in tl.static_range(K):
        _, idx = _best_of(sel, cols, E_PAD)  # ties: the lowest index
        hit = cols[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), 1)
        ids = tl.where(kcols[None, :] == j, idx[:, None].to(tl.int64), ids)
        w = tl.where(kcols[None, :] == j, wj[:, None], w)
        sel = tl.where(hit, float("-inf"), sel)
    if RENORM:
        total = tl.sum(w, 1)
        w = w / tl.where(total > 0, total, 1.0)[:, None]
    w = w * scale
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    omask = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(IDS + out, ids, mask=omask)
    tl.store(W + out, w, mask=omask)


@triton.jit
def _topk_route_bwd_kernel(
    L, IDS, W, DW, DL, T, E, stride_l, stride_dl, scale,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < T
    s, valid = _row_scores(L, rows, cols, T, E, stride_l, SIGMOID)
    kmask = row_ok[:, None] & (kcols < K)[None, :]
    at = rows[:, None].to(tl.int64) * K + kcols[None, :]
    ids = tl.load(IDS + at, mask=kmask, other=E_PAD)
    w = tl.load(W + at, mask=kmask, other=0.0)
    dw = tl.load(DW + at, mask=kmask, other=0.0).to(tl.float32)
    wdw = tl.sum(w * dw, 1)  # [BT]: sum_j w_j dw_j
    dl = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    if SIGMOID:
        ssum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in tl.static_range(K):
            idx = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
            ssum += tl.sum(tl.where(cols[None, :] == idx[:, None], s, 0.0), 1)
    for j in tl.static_range(K):
        idx = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
        dwj = tl.sum(tl.where(kcols[None, :] == j, dw, 0.0), 1)
        wj = tl.sum(tl.where(kcols[None, :] == j, w, 0.0), 1)
        hit = cols[None, :] == idx[:, None]
        if SIGMOID:
            sj = tl.sum(tl.where(hit, s, 0.0), 1)
            if RENORM:  # w_j = c s_j / S
                ds = scale / tl.where(ssum > 0, ssum, 1.0) * (dwj - wdw / scale)
            else:  # w_j = c s_j
                ds = scale * dwj
            g = ds * sj * (1.0 - sj)
        elif RENORM:  # w = c * softmax over the selected logits
            g = wj * (dwj - wdw / scale)
        else:  # w_j = c p_j: the selected entries' share of the softmax Jacobian
            g = wj * dwj
        dl += tl.where(hit, g[:, None], 0.0)
    if not SIGMOID:
        if not RENORM:
            dl -= s * wdw[:, None]  # - p_i * sum_j dw_j w_j (full-softmax term)
    tl.store(DL + rows[:, None].to(tl.int64) * stride_dl + cols[None, :],
             dl.to(DL.dtype.element_ty), mask=valid)


def row_blocks(E: int) -> tuple[int, int]:
    """A kernel over [rows, E] logits: (E padded to a power of 2, rows a program takes, at
    most 4096 elements a block)."""
    e_pad = max(2, triton.next_power_of_2(E))  # no size-1 blocks (k = 1, E = 1)
    return e_pad, max(1, min(64, 4096 // e_pad))


def _meta(E: int, k: int) -> dict:
    e_pad, block_t = row_blocks(E)
    return dict(K=k, K_PAD=max(2, triton.next_power_of_2(k)), E_PAD=e_pad, BLOCK_T=block_t)


def topk_route_fwd(logits: torch.Tensor, bias: torch.Tensor | None, k: int, sigmoid: bool,
                   renormalize: bool, scale: float,
                   groups: tuple[int, int, bool] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> expert_ids [T, k] int64 (best first), weights [T, k] float32; groups
    (n_group, topk_group, top2): group-limited selection (kernels.topk_route)."""
    logits = logits.contiguous()
    T, E = logits.shape
    ids = common.empty_index(T, k, device=logits.device)
    w = common.empty(T, k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, w
    meta = _meta(E, k)
    grid = (common.cdiv(T, meta["BLOCK_T"]),)
    b = bias.float().contiguous() if bias is not None else logits
    n_group, topk_group, top2 = groups if groups is not None else (1, 1, False)
    _topk_route_kernel[grid](logits, b, ids, w, T, E, logits.stride(0), float(scale),
                             E // n_group, SIGMOID=sigmoid, RENORM=renormalize,
                             HAS_BIAS=bias is not None, N_GROUP=n_group,
                             G_PAD=max(2, triton.next_power_of_2(n_group)),
                             TOPK_GROUP=topk_group, TOP2=top2, **meta)
    return ids, w


def topk_route_bwd(logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                   dw: torch.Tensor, sigmoid: bool, renormalize: bool,
                   scale: float) -> torch.Tensor:
    """d(weights) [T, k] -> d(logits) [T, E] (selection treated as constant)."""
    logits = logits.contiguous()
    T, E = logits.shape
    dl = common.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return dl
    meta = _meta(E, ids.shape[1])
    grid = (common.cdiv(T, meta["BLOCK_T"]),)
    _topk_route_bwd_kernel[grid](logits, ids.contiguous(), w.contiguous(),
                                 dw.contiguous().float(), dl, T, E, logits.stride(0),
                                 dl.stride(0), float(scale), SIGMOID=sigmoid,
                                 RENORM=renormalize, **meta)
    return dl


@triton.jit
def _block_hist_kernel(IDS, HIST, M, E1, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """HIST[b, e] = pairs of block b with expert e (e in [0, E], E = dropped)."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(IDS + i, mask=i < M, other=E_PAD).to(tl.int32)
    cols = tl.arange(0, E_PAD)
    counts = tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0)
    tl.store(HIST + b * E1 + cols, counts, mask=cols < E1)


@triton.jit
def _scan_kernel(HIST, START, TOTAL, NB, E1, CHUNK: tl.constexpr):
    """Column e of HIST [NB, E1]: START[b, e] = pairs of expert e in the blocks before b,
    TOTAL[e] = all of expert e's pairs."""
    e = tl.program_id(0)
    carry = tl.full([], 0, tl.int32)
    for b0 in range(0, NB, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        ok = b < NB
        h = tl.load(HIST + b * E1 + e, mask=ok, other=0)
        tl.store(START + b * E1 + e, carry + tl.cumsum(h, 0) - h, mask=ok)
        carry += tl.sum(h, 0)
    tl.store(TOTAL + e, carry)


@triton.jit
def _place_kernel(IDS, START, TOTAL, OFFSETS, OUT_PAIR, OUT_TOKEN, OUT_EXPERT, OUT_ROW, M, E1,
                  top_k, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """Each pair to offsets[e] + START[b, e] + (pairs of expert e before it in block b): a
    stable sort. offsets[e] = pairs of the experts before e (from TOTAL; program 0 writes
    them out). OUT_ROW[pair] = its sorted row (the inverse permutation)."""
    b = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    total = tl.load(TOTAL + cols, mask=cols < E1, other=0).to(tl.int64)
    offsets = tl.cumsum(total, 0) - total
    if b == 0:
        tl.store(OFFSETS + cols, offsets, mask=cols < E1)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ok = i < M
    e = tl.load(IDS + i, mask=ok, other=E_PAD).to(tl.int32)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    before = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)
    first = tl.sum(tl.where(onehot != 0, offsets[None, :], 0), 1)
    start = tl.load(START + b * E1 + e, mask=ok, other=0)
    pos = first + start + before
    tl.store(OUT_PAIR + pos, i.to(tl.int64), mask=ok)
    tl.store(OUT_TOKEN + pos, (i // top_k).to(tl.int64), mask=ok)
    tl.store(OUT_EXPERT + pos, e.to(tl.int64), mask=ok)
    tl.store(OUT_ROW + i, pos, mask=ok)


@triton.jit
def _sort_one_block_kernel(IDS, OFFSETS, OUT_PAIR, OUT_TOKEN, OUT_EXPERT, OUT_ROW, M, E1,
                           top_k, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """_block_hist_kernel, _scan_kernel and _place_kernel in one program, for M <= BLOCK
    pairs (a decode step's): the counts are the block's own, no block comes before it."""
    cols = tl.arange(0, E_PAD)
    i = tl.arange(0, BLOCK)
    ok = i < M
    e = tl.load(IDS + i, mask=ok, other=E_PAD).to(tl.int32)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)  # padding rows: all 0
    total = tl.sum(onehot, 0).to(tl.int64)
    offsets = tl.cumsum(total, 0) - total
    tl.store(OFFSETS + cols, offsets, mask=cols < E1)
    before = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)
    first = tl.sum(tl.where(onehot != 0, offsets[None, :], 0), 1)
    pos = first + before
    tl.store(OUT_PAIR + pos, i.to(tl.int64), mask=ok)
    tl.store(OUT_TOKEN + pos, (i // top_k).to(tl.int64), mask=ok)
    tl.store(OUT_EXPERT + pos, e.to(tl.int64), mask=ok)
    tl.store(OUT_ROW + i, pos, mask=ok)


def sort_pairs(flat_ids: torch.Tensor, num_experts: int, top_k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat_ids [M] (E = dropped) -> sorted_pair_idx, sorted_token_idx, sorted_expert_idx
    [M] int64 (stable: slot order within an expert), expert_offsets [E + 1] int64, slot_rows
    [M] int64 (each pair's sorted row)."""
    M, E1 = flat_ids.numel(), num_experts + 1
    dev = flat_ids.device
    outs = [common.empty_index(M, device=dev) for _ in range(3)]
    rows = common.empty_index(M, device=dev)
    if M == 0:
        return (*outs, torch.zeros(E1, dtype=torch.int64, device=dev), rows)
    ids = flat_ids.contiguous()  # int32 or int64: read as they are
    e_pad = triton.next_power_of_2(E1)
    block = max(16, min(256, 8192 // e_pad))
    nb = common.cdiv(M, block)
    offsets = torch.empty(E1, dtype=torch.int64, device=dev)
    if nb == 1:  # one launch, not three
        _sort_one_block_kernel[(1,)](ids, offsets, *outs, rows, M, E1, top_k, BLOCK=block,
                                     E_PAD=e_pad)
        return (*outs, offsets, rows)
    hist = torch.empty(nb, E1, dtype=torch.int32, device=dev)  # every entry written
    start = torch.empty(nb, E1, dtype=torch.int32, device=dev)
    total = torch.empty(E1, dtype=torch.int32, device=dev)
    _block_hist_kernel[(nb,)](ids, hist, M, E1, BLOCK=block, E_PAD=e_pad)
    _scan_kernel[(E1,)](hist, start, total, nb, E1, CHUNK=1024)
    _place_kernel[(nb,)](ids, start, total, offsets, *outs, rows, M, E1, top_k, BLOCK=block,
                         E_PAD=e_pad)
    return (*outs, offsets, rows)
