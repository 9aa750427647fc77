"""A token-choice router's losses in fused kernels.

router_losses_fwd: logits [T, E] and the selected expert ids [T, k] -> the Switch
load-balancing loss (over the batch, or averaged over sequences of seq_len tokens as
DeepSeek-V3's sequence-wise loss), the z-loss and the softmax entropy, in two kernels: one pass
over blocks of rows (no block straddles two sequences) that writes per-block partial sums
(each expert's probability mass and selection count, the rows' logsumexp^2 and entropy), then
one program that adds the blocks up. No atomics: the sums are the same on every run.
router_losses_bwd: the three losses' gradients -> d(logits) [T, E] in one more pass. Replaces
about 30 torch launches a step (probabilities, counts, the three reductions and their
backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import loss_dtype
from kernels.triton import common
from kernels.triton.routing import row_blocks


@triton.jit
def _row_stats(L, rows, row_ok, cols, E, stride_l, SIGMOID: tl.constexpr):
    """Logit rows (those of row_ok) -> (softmax p [BT, EP], logsumexp [BT] (0 outside), the
    probabilities the balancing loss reads [BT, EP] (p, or sigmoid scores over their row
    sum), the sigmoid scores and their row sums (SIGMOID only; else p and ones), validity
    mask)."""
    valid = row_ok[:, None] & (cols < E)[None, :]
    x = tl.load(L + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=valid,
                other=0.0).to(tl.float32)
    m = tl.max(tl.where(valid, x, float("-inf")), 1)
    m = tl.where(m > float("-inf"), m, 0.0)  # rows outside: no exp(inf)
    e = tl.where(valid, tl.exp(x - m[:, None]), 0.0)
    den = tl.sum(e, 1)
    den = tl.where(den > 0, den, 1.0)
    p = e / den[:, None]
    lse = m + tl.log(den)
    if SIGMOID:
        s = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)
        ssum = tl.sum(s, 1)
        ssum = tl.where(ssum > 0, ssum, 1.0)
        q = s / ssum[:, None]
    else:
        s = p
        ssum = den * 0.0 + 1.0
        q = p
    return p, lse, q, s, ssum, valid


@triton.jit
def _loss_partials_kernel(L, IDS, PSUM, CNT, ROWS, S, E, stride_l, K: tl.constexpr,
                          E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SIGMOID: tl.constexpr,
                          ENTROPY: tl.constexpr):
    """Block j of sequence n (S rows each; b = n * blocks a sequence + j): PSUM[b, e] = its
    probability mass on expert e, CNT[b, e] = its slots that chose e, ROWS[b] = (sum of
    logsumexp^2, sum of entropies)."""
    j, n = tl.program_id(0), tl.program_id(1)
    b = n * tl.num_programs(0) + j
    in_seq = j * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = in_seq < S
    rows = n.to(tl.int64) * S + in_seq
    cols = tl.arange(0, E_PAD)
    p, lse, q, _, _, valid = _row_stats(L, rows, row_ok, cols, E, stride_l, SIGMOID)
    out = b.to(tl.int64) * E + cols
    tl.store(PSUM + out, tl.sum(q, 0), mask=cols < E)
    cnt = tl.zeros((E_PAD,), dtype=tl.float32)
    for i in tl.static_range(K):
        ids = tl.load(IDS + rows * K + i, mask=row_ok, other=E_PAD)
        cnt += tl.sum((ids[:, None] == cols[None, :]).to(tl.float32), 0)
    tl.store(CNT + out, cnt, mask=cols < E)
    tl.store(ROWS + 2 * b, tl.sum(tl.where(row_ok, lse * lse, 0.0), 0))
    if ENTROPY:
        plogp = tl.where(valid, p * tl.log(tl.maximum(p, 1e-20)), 0.0)
        tl.store(ROWS + 2 * b + 1, -tl.sum(tl.sum(plogp, 1), 0))
    else:
        tl.store(ROWS + 2 * b + 1, 0.0)


@triton.jit
def _loss_finish_kernel(PSUM, CNT, ROWS, AUX, Z, ENT, SEQ_COUNTS, COUNTS, NSEQ, NBS, E,
                        aux_scale, inv_t, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program: the blocks' partial sums (NBS blocks a sequence) -> AUX = aux_scale *
    sum over sequences n of sum_e counts_ne mass_ne, Z, ENT (scalars), SEQ_COUNTS [NSEQ, E]
    and COUNTS [E] (int64)."""
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    aux = tl.zeros((E_PAD,), dtype=tl.float32)
    total = tl.zeros((E_PAD,), dtype=tl.float32)
    for n in range(NSEQ):
        mass = tl.zeros((E_PAD,), dtype=tl.float32)
        cnt = tl.zeros((E_PAD,), dtype=tl.float32)
        for b0 in range(0, NBS, CHUNK):
            b = b0 + tl.arange(0, CHUNK)
            ok = b < NBS
            at = (n * NBS + b)[:, None].to(tl.int64) * E + cols[None, :]
            both = ok[:, None] & col_ok[None, :]
            mass += tl.sum(tl.load(PSUM + at, mask=both, other=0.0), 0)
            cnt += tl.sum(tl.load(CNT + at, mask=both, other=0.0), 0)
        aux += cnt * mass
        total += cnt
        tl.store(SEQ_COUNTS + n * E + cols, cnt.to(tl.int64), mask=col_ok)
    z = tl.zeros((CHUNK,), dtype=tl.float32)
    ent = tl.zeros((CHUNK,), dtype=tl.float32)
    for b0 in range(0, NSEQ * NBS, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        ok = b < NSEQ * NBS
        z += tl.load(ROWS + 2 * b, mask=ok, other=0.0)
        ent += tl.load(ROWS + 2 * b + 1, mask=ok, other=0.0)
    tl.store(AUX, tl.sum(aux, 0) * aux_scale)
    tl.store(Z, tl.sum(z, 0) * inv_t)
    tl.store(ENT, tl.sum(ent, 0) * inv_t)
    tl.store(COUNTS + cols, total.to(tl.int64), mask=col_ok)


@triton.jit
def _loss_bwd_kernel(L, SEQ_COUNTS, DAUX, DZ, DENT, DL, T, S, E, stride_l, stride_dl,
                     aux_scale, inv_t, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                     SIGMOID: tl.constexpr, ENTROPY: tl.constexpr):
    """d(aux), d(z), d(entropy) (scalars on the device) -> DL [T, E]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    p, lse, q, s, ssum, valid = _row_stats(L, rows, rows < T, cols, E, stride_l, SIGMOID)
    # aux = aux_scale * sum_n sum_e counts_ne * sum_(t in n) q_te: d(aux)/d(q_te) = g_(n(t))e
    g = tl.load(SEQ_COUNTS + (rows // S)[:, None].to(tl.int64) * E + cols[None, :], mask=valid,
                other=0).to(tl.float32) * (aux_scale * tl.load(DAUX))
    dl = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    gp = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)  # d(loss)/d(p) of the softmax terms
    if SIGMOID:  # q = s / sum(s), s = sigmoid(x)
        ds = (g - tl.sum(q * g, 1)[:, None]) / ssum[:, None]
        dl += ds * s * (1.0 - s)
    else:
        gp += g
    if ENTROPY:  # entropy = -inv_t * sum p log max(p, eps); d/dp's "+ 1" cancels below
        gp -= (tl.load(DENT) * inv_t) * tl.log(tl.maximum(p, 1e-20))
    dl += p * (gp - tl.sum(p * gp, 1)[:, None])
    dl += (2.0 * inv_t * tl.load(DZ)) * lse[:, None] * p  # z = inv_t * sum lse^2
    tl.store(DL + rows[:, None].to(tl.int64) * stride_dl + cols[None, :],
             dl.to(DL.dtype.element_ty), mask=valid)


def _aux_scale(T: int, S: int, k: int, E: int) -> float:
    """aux = E / (S k S) * sum_e counts_ne mass_ne, averaged over the T / S sequences."""
    return E / (S * k * S) / (T // S)


def router_losses_fwd(logits: torch.Tensor, ids: torch.Tensor, sigmoid: bool, entropy: bool,
                      seq_len: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """logits [T, E], ids [T, k] -> aux, z, entropy (0-dim float32, float64 for float64
    logits; entropy 0 unless asked), the per-expert selection counts [E] int64, and those of
    each sequence [T / seq_len, E] (the backward reads them). seq_len (dividing T): the aux
    loss per sequence of seq_len tokens, averaged; None: over the batch."""
    logits = logits.contiguous()
    T, E = logits.shape
    k = ids.shape[1]
    S = seq_len or max(T, 1)
    dev = logits.device
    aux, z, ent = (common.empty((), dtype=loss_dtype(logits), device=dev) for _ in range(3))
    counts = common.empty_index(E, device=dev)
    seq_counts = common.empty_index(T // S, E, device=dev)
    if T == 0:
        return aux.zero_(), z.zero_(), ent.zero_(), counts.zero_(), seq_counts
    e_pad, block = row_blocks(E)
    nbs, nseq = common.cdiv(S, block), T // S
    psum = torch.empty(nseq * nbs, E, dtype=torch.float32, device=dev)  # every entry written
    cnt = torch.empty(nseq * nbs, E, dtype=torch.float32, device=dev)
    rows = torch.empty(nseq * nbs, 2, dtype=torch.float32, device=dev)
    _loss_partials_kernel[(nbs, nseq)](
        logits, ids.contiguous(), psum, cnt, rows, S, E, logits.stride(0), K=k, E_PAD=e_pad,
        BLOCK_T=block, SIGMOID=sigmoid, ENTROPY=entropy, num_warps=8)
    _loss_finish_kernel[(1,)](psum, cnt, rows, aux, z, ent, seq_counts, counts, nseq, nbs, E,
                              _aux_scale(T, S, k, E), 1.0 / T, E_PAD=e_pad,
                              CHUNK=max(1, 4096 // e_pad))
    return aux, z, ent, counts, seq_counts


def router_losses_bwd(logits: torch.Tensor, seq_counts: torch.Tensor, k: int,
                      daux: torch.Tensor, dz: torch.Tensor, dent: torch.Tensor, sigmoid: bool,
                      entropy: bool) -> torch.Tensor:
    """The losses' gradients (0-dim) -> d(logits) [T, E] in the logits' dtype; seq_counts
    [T / seq_len, E] from the forward."""
    logits = logits.contiguous()
    T, E = logits.shape
    dl = common.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return dl
    S = T // seq_counts.shape[0]
    e_pad, block = row_blocks(E)
    _loss_bwd_kernel[(common.cdiv(T, block),)](
        logits, seq_counts, daux.float(), dz.float(), dent.float(), dl, T, S, E,
        logits.stride(0), dl.stride(0), _aux_scale(T, S, k, E), 1.0 / T, E_PAD=e_pad,
        BLOCK_T=block, SIGMOID=sigmoid, ENTROPY=entropy, num_warps=8)
    return dl
