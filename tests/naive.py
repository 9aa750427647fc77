"""Obviously-right float64 references: loops over tokens, slots and experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe import MoELayer


def _act(kind, h):
    if kind == "swiglu":
        f = h.shape[0] // 2
        return F.silu(h[:f]) * h[f:]
    return F.gelu(h)


def naive_expert(x_t, w_in, w_out, kind):
    """x_t [d], w_in [F_in, d], w_out [d, F] -> [d]: one token through one expert."""
    return w_out @ _act(kind, w_in @ x_t)


def naive_route(layer: MoELayer, x, token_ids=None, seq_len=None):
    """x [T, d] -> (slots, aux) where slots[t] = list of (expert, weight tensor, kept: bool)."""
    cfg = layer.cfg.router
    E = layer.cfg.num_experts
    T, k = x.shape[0], cfg.top_k
    router = layer.router
    slots = [[] for _ in range(T)]
    aux = x.new_zeros(())
    if cfg.kind == "hash":
        for t in range(T):
            for e in router.table[int(token_ids[t])].tolist():
                slots[t].append([e, x.new_tensor(1.0 / k), True])
    elif cfg.kind == "expert_choice":
        probs = [torch.softmax(router.weight @ x[t], 0) for t in range(T)]
        c = cfg.capacity_factor if cfg.capacity_factor is not None else k
        cap = min(T, math.ceil(c * T / E))
        for e in range(E):
            ranked = sorted(range(T), key=lambda t: -float(probs[t][e].detach()))
            for t in ranked[:cap]:
                slots[t].append([e, probs[t][e], True])
    else:
        per_token_probs = []
        for t in range(T):
            logits = router.weight @ x[t]
            if cfg.score == "softmax":
                scores = torch.softmax(logits, 0)
                per_token_probs.append(scores)
            else:
                scores = torch.sigmoid(logits)
                per_token_probs.append(scores / scores.sum())
            sel = [float(scores[e].detach()) for e in range(E)]
            if router.expert_bias is not None:
                sel = [s + float(router.expert_bias[e]) for e, s in enumerate(sel)]
            chosen = sorted(range(E), key=lambda e: -sel[e])[:k]
            if cfg.kind == "threshold":  # best first, until the probabilities reach p
                taken, mass = [], 0.0
                for e in chosen:
                    if mass >= router.threshold:
                        break
                    taken.append(e)
                    mass += sel[e]
                chosen = taken
            ws = [scores[e] for e in chosen]
            total = sum(ws)
            for e, w in zip(chosen, ws, strict=False):
                w = w / total if cfg.renormalize else w
                slots[t].append([e, w * cfg.routed_scaling_factor, True])
        # Switch loss, by its formula, per sequence (or one sequence of all tokens).
        L = seq_len if (cfg.aux_loss_type == "sequence" and seq_len) else T
        losses = []
        for s0 in range(0, T, L):
            toks = range(s0, s0 + L)
            terms = []
            n_slots = sum(len(slots[t]) for t in toks)  # L * k unless threshold routing
            for e in range(E):
                f = sum(1 for t in toks for (ee, _, _) in slots[t] if ee == e) / n_slots
                p = sum(per_token_probs[t][e] for t in toks) / L
                terms.append(f * p)
            losses.append(E * sum(terms))
        aux = sum(losses) / len(losses)
    if cfg.capacity_factor is not None and cfg.kind != "expert_choice":
        cap = math.ceil(cfg.capacity_factor * T * k / E)
        order = [(t, j) for j in range(k) for t in range(T)  # first choices first
                 if j < len(slots[t])]
        if cfg.drop_policy == "probs":
            order.sort(key=lambda tj: -float(slots[tj[0]][tj[1]][1].detach()))
        used = [0] * E
        for t, j in order:
            e = slots[t][j][0]
            if used[e] >= cap:
                slots[t][j][2] = False
            else:
                used[e] += 1
    return slots, aux


def naive_moe(layer: MoELayer, x, token_ids=None, seq_len=None):
    """x [T, d] -> (out [T, d], aux loss, z loss) computed token by token."""
    kind = layer.cfg.expert_type
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    slots, aux = naive_route(layer, x, token_ids, seq_len)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for e, w, kept in slots[t]:
            if kept:
                acc = acc + w * naive_expert(x[t], w_in[e], w_out[e], kind)
        if layer.shared is not None:
            sh = layer.shared
            y = naive_expert(x[t], sh.mlp.w_in.weight, sh.mlp.w_out.weight, kind)
            if sh.gate is not None:
                y = torch.sigmoid(sh.gate.weight[0] @ x[t]) * y
            acc = acc + y
        rows.append(acc)
    out = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    z = x.new_zeros(())
    if layer.cfg.router.kind != "hash" and x.shape[0]:
        z = sum(torch.logsumexp(layer.router.weight @ x[t], 0) ** 2 for t in range(x.shape[0]))
        z = z / x.shape[0]
    return out, aux, z, slots
