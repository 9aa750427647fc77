"""A token-choice router's losses in fused kernels.

router_losses_fwd: logits [T, E] and the selected expert ids [T, k] -> the Switch
load-balancing loss (batch-wise), the z-loss and the softmax entropy, in two kernels: one pass
over blocks of rows that writes per-block partial sums (each expert's probability mass and
selection count, the rows' logsumexp^2 and entropy), then one program that adds the blocks up.
No atomics: the sums are the same on every run. router_losses_bwd: the three losses' gradients
-> d(logits) [T, E] in one more pass. Replaces about 30 torch launches a step (probabilities,
counts, the three reductions and their backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import common


@triton.jit
def _row_stats(L, rows, cols, T, E, stride_l, SIGMOID: tl.constexpr):
    """Logit rows -> (softmax p [BT, EP], logsumexp [BT] (0 past T), the probabilities the
    balancing loss reads [BT, EP] (p, or sigmoid scores over their row sum), the sigmoid
    scores and their row sums (SIGMOID only; else p and ones), validity mask)."""
    valid = (rows < T)[:, None] & (cols < E)[None, :]
    x = tl.load(L + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=valid,
                other=0.0).to(tl.float32)
    m = tl.max(tl.where(valid, x, float("-inf")), 1)
    m = tl.where(m > float("-inf"), m, 0.0)  # rows past T: no exp(inf)
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
def _loss_partials_kernel(L, IDS, PSUM, CNT, ROWS, T, E, stride_l,
                     K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                     SIGMOID: tl.constexpr, ENTROPY: tl.constexpr):
    """Block b of rows: PSUM[b, e] = its probability mass on expert e, CNT[b, e] = its slots
    that chose e, ROWS[b] = (sum of logsumexp^2, sum of entropies)."""
    b = tl.program_id(0)
    rows = b * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    p, lse, q, _, _, valid = _row_stats(L, rows, cols, T, E, stride_l, SIGMOID)
    out = b.to(tl.int64) * E + cols
    tl.store(PSUM + out, tl.sum(q, 0), mask=cols < E)
    cnt = tl.zeros((E_PAD,), dtype=tl.float32)
    for j in tl.static_range(K):
        ids = tl.load(IDS + rows.to(tl.int64) * K + j, mask=row_ok, other=E_PAD)
        cnt += tl.sum((ids[:, None] == cols[None, :]).to(tl.float32), 0)
    tl.store(CNT + out, cnt, mask=cols < E)
    tl.store(ROWS + 2 * b, tl.sum(tl.where(row_ok, lse * lse, 0.0), 0))
    if ENTROPY:
        plogp = tl.where(valid, p * tl.log(tl.maximum(p, 1e-20)), 0.0)
        tl.store(ROWS + 2 * b + 1, -tl.sum(tl.sum(plogp, 1), 0))
    else:
        tl.store(ROWS + 2 * b + 1, 0.0)


@triton.jit
def _loss_finish_kernel(PSUM, CNT, ROWS, AUX, Z, ENT, COUNTS, NB, E, aux_scale, inv_t,
                   E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program: the blocks' partial sums -> AUX, Z, ENT (scalars) and COUNTS [E] int64."""
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    mass = tl.zeros((E_PAD,), dtype=tl.float32)
    cnt = tl.zeros((E_PAD,), dtype=tl.float32)
    z = tl.zeros((CHUNK,), dtype=tl.float32)
    ent = tl.zeros((CHUNK,), dtype=tl.float32)
    for b0 in range(0, NB, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        ok = b < NB
        at = b[:, None].to(tl.int64) * E + cols[None, :]
        both = ok[:, None] & col_ok[None, :]
        mass += tl.sum(tl.load(PSUM + at, mask=both, other=0.0), 0)
        cnt += tl.sum(tl.load(CNT + at, mask=both, other=0.0), 0)
        z += tl.load(ROWS + 2 * b, mask=ok, other=0.0)
        ent += tl.load(ROWS + 2 * b + 1, mask=ok, other=0.0)
    tl.store(AUX, tl.sum(cnt * mass, 0) * aux_scale)
    tl.store(Z, tl.sum(z, 0) * inv_t)
    tl.store(ENT, tl.sum(ent, 0) * inv_t)
    tl.store(COUNTS + cols, cnt.to(tl.int64), mask=col_ok)


@triton.jit
def _loss_bwd_kernel(L, COUNTS, DAUX, DZ, DENT, DL, T, E, stride_l, stride_dl, aux_scale, inv_t,
                E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SIGMOID: tl.constexpr,
                ENTROPY: tl.constexpr):
    """d(aux), d(z), d(entropy) (scalars on the device) -> DL [T, E]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    p, lse, q, s, ssum, valid = _row_stats(L, rows, cols, T, E, stride_l, SIGMOID)
    # aux = aux_scale * sum_e counts_e * sum_t q_te: d(aux)/d(q_te) = g_e for every row
    g = tl.load(COUNTS + cols, mask=cols < E, other=0).to(tl.float32) * (aux_scale *
                                                                          tl.load(DAUX))
    dl = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    gp = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)  # d(loss)/d(p) of the softmax terms
    if SIGMOID:  # q = s / sum(s), s = sigmoid(x)
        gq = tl.where(valid, g[None, :], 0.0)
        ds = (gq - tl.sum(q * gq, 1)[:, None]) / ssum[:, None]
        dl += ds * s * (1.0 - s)
    else:
        gp += g[None, :]
    if ENTROPY:  # entropy = -inv_t * sum p log max(p, eps); d/dp's "+ 1" cancels below
        gp -= (tl.load(DENT) * inv_t) * tl.log(tl.maximum(p, 1e-20))
    dl += p * (gp - tl.sum(p * gp, 1)[:, None])
    dl += (2.0 * inv_t * tl.load(DZ)) * lse[:, None] * p  # z = inv_t * sum lse^2
    tl.store(DL + rows[:, None].to(tl.int64) * stride_dl + cols[None, :],
             dl.to(DL.dtype.element_ty), mask=valid)


def _meta(E: int) -> tuple[int, int]:
    e_pad = max(2, triton.next_power_of_2(E))
    return e_pad, max(1, min(64, 4096 // e_pad))


def router_losses_fwd(logits: torch.Tensor, ids: torch.Tensor, sigmoid: bool, entropy: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E], ids [T, k] -> aux, z, entropy (0-dim float32, float64 for float64
    logits; entropy 0 unless asked) and the per-expert selection counts [E] int64 (the
    backward reads them too)."""
    logits = logits.contiguous()
    T, E = logits.shape
    k = ids.shape[1]
    dev = logits.device
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    aux, z, ent = (common.empty((), dtype=dtype, device=dev) for _ in range(3))
    counts = common.empty_index(E, device=dev)
    if T == 0:
        return aux.zero_(), z.zero_(), ent.zero_(), counts.zero_()
    e_pad, block = _meta(E)
    nb = common.cdiv(T, block)
    psum = torch.empty(nb, E, dtype=torch.float32, device=dev)  # every entry written
    cnt = torch.empty(nb, E, dtype=torch.float32, device=dev)
    rows = torch.empty(nb, 2, dtype=torch.float32, device=dev)
    _loss_partials_kernel[(nb,)](logits, ids.contiguous(), psum, cnt, rows, T, E, logits.stride(0),
                            K=k, E_PAD=e_pad, BLOCK_T=block, SIGMOID=sigmoid,
                            ENTROPY=entropy, num_warps=8)
    _loss_finish_kernel[(1,)](psum, cnt, rows, aux, z, ent, counts, nb, E, E / (T * k * T), 1.0 / T,
                         E_PAD=e_pad, CHUNK=max(1, 4096 // e_pad))
    return aux, z, ent, counts


def router_losses_bwd(logits: torch.Tensor, counts: torch.Tensor, k: int, daux: torch.Tensor,
                      dz: torch.Tensor, dent: torch.Tensor, sigmoid: bool, entropy: bool
                      ) -> torch.Tensor:
    """The losses' gradients (0-dim) -> d(logits) [T, E] in the logits' dtype."""
    logits = logits.contiguous()
    T, E = logits.shape
    dl = common.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return dl
    e_pad, block = _meta(E)
    _loss_bwd_kernel[(common.cdiv(T, block),)](
        logits, counts, daux.float(), dz.float(), dent.float(), dl, T, E, logits.stride(0),
        dl.stride(0), E / (T * k * T), 1.0 / T, E_PAD=e_pad, BLOCK_T=block, SIGMOID=sigmoid,
        ENTROPY=entropy, num_warps=8)
    return dl
