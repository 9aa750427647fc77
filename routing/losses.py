"""Load-balancing losses and the aux-loss-free bias rule."""

from __future__ import annotations

from collections.abc import Callable

import torch

from routing.capacity import count_per_expert


def switch_aux_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, seq_len: int | None = None,
    used: torch.Tensor | None = None,
) -> torch.Tensor:
    """probs [T, E], expert_ids [T, k] -> scalar Switch load-balancing loss.

    loss = E * sum_i f_i * P_i with f_i = (slots selecting expert i) / (T * k) and P_i the mean
    probability of expert i (Fedus et al. 2021, generalised to k slots as Megatron-core does:
    a perfectly balanced router scores 1). With ``seq_len``, f and P are taken per sequence of
    ``seq_len`` consecutive tokens and the loss is averaged over sequences (DeepSeek-V3's
    sequence-wise balance loss without its alpha). used [T, k] bool: only these slots count
    (threshold routing), and f_i is over the used slots.
    """
    T, k = expert_ids.shape
    if T == 0:
        return probs.sum() * 0.0
    if used is None and (seq_len is None or seq_len == T):  # one batch of T * k slots
        counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
        counts.scatter_add_(0, expert_ids.reshape(-1),
                            torch.ones(T * k, dtype=probs.dtype, device=probs.device))
        return (counts * probs.mean(0)).sum() * (num_experts / (T * k))
    if used is None:
        used = torch.ones_like(expert_ids, dtype=torch.bool)
    selected = torch.zeros(T, num_experts, dtype=probs.dtype, device=probs.device)
    selected.scatter_add_(1, expert_ids, used.to(probs.dtype))
    if seq_len is None:
        seq_len = T
    if T % seq_len:
        raise ValueError(f"{T} tokens do not split into sequences of length {seq_len}")
    selected = selected.view(-1, seq_len, num_experts)
    n_used = selected.sum((1, 2)).clamp(min=1)[:, None]  # [B, 1]: seq_len * k without drops
    f = selected.sum(1) / n_used  # [B, E]
    p = probs.view(-1, seq_len, num_experts).mean(1)  # [B, E]
    return (num_experts * (f * p).sum(-1)).mean()


def global_batch_aux_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
    used: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """probs [T, E], expert_ids [T, k] -> scalar E * sum_i f_i * P_i with f_i the share of
    the global batch's slots that chose expert i and P_i this rank's mean probability of i
    (global-batch balancing, Qiu et al. 2025). reduce(counts [E] float32) sums the slot
    counts over the data-parallel ranks (None: this process holds the whole batch); it is a
    collective, so it runs even for 0 tokens. used [T, k] bool: only these slots count.
    Averaged over equal-sized ranks, the losses equal the micro-batch loss of their union."""
    counts = count_per_expert(expert_ids, num_experts, used).to(torch.float32)
    if reduce is not None:
        counts = reduce(counts)
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = (counts / counts.sum().clamp(min=1)).to(probs.dtype)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [T, E] -> scalar mean of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs [T, E] (softmax) -> scalar mean entropy -sum_i p_i log p_i: small when each token
    puts its mass on few experts (the dynamic loss of threshold routing, Huang et al. 2024)."""
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    return -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1).mean()


def aux_free_bias_update(
    bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float
) -> torch.Tensor:
    """bias [E], tokens_per_expert [E] -> new bias [E] (DeepSeek-V3 aux-loss-free balancing).

    Each expert's bias moves by ``rate`` towards balance: down if the expert took more than the
    mean load, up if it took less, unchanged if exactly at the mean.
    """
    load = tokens_per_expert.to(bias.dtype)
    return bias + rate * torch.sign(load.mean() - load)
