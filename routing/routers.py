"""Routers: x [T, d] -> `Routing`. Token-choice top-k and threshold (top-p), expert choice,
hash."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import router_losses, topk_route
from kernels.device import autocast_dtype
from routing.capacity import capacity_drop_mask, count_per_expert, expert_capacity
from routing.config import TOKEN_CHOICE, RouterConfig
from routing.losses import (
    aux_free_bias_update,
    global_batch_aux_loss,
    router_entropy,
    router_z_loss,
    switch_aux_loss,
)
from routing.schedule import scheduled
from routing.types import Routing


def _check_input(x: torch.Tensor, d_model: int) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"router input must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"router input must be [tokens, d_model], got shape {tuple(x.shape)}")
    if x.shape[1] != d_model:
        raise ValueError(
            f"hidden size {x.shape[1]} does not match the router's d_model={d_model}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Routing decisions in at least float32 (bf16 logits flip top-k choices).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Router(nn.Module):
    """Base class: holds the config and turns selections into a `Routing`."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        cfg.check(num_experts)
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts

    @property
    def may_drop(self) -> bool:
        """Whether a Routing from this router can hold dropped slots."""
        return self.cfg.kind in ("expert_choice", "threshold") or \
            self.cfg.capacity_factor is not None

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> logits [T, E] in at least float32; under torch.autocast the gate runs
        in its weight's dtype all the same (float32 weights: float32 logits)."""
        if autocast_dtype(x) is None:
            logits = F.linear(x, self.weight, getattr(self, "bias", None))
        else:
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.to(self.weight.dtype), self.weight,
                                  getattr(self, "bias", None))
        logits = logits.to(_compute_dtype(x))
        if self.cfg.validate and bool(torch.isnan(logits).any()):
            raise ValueError(
                "router logits contain NaN: the hidden states or the gate weight hold NaN/inf"
            )
        return logits

    def _finish(
        self,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        aux_loss: torch.Tensor,
        z_loss: torch.Tensor,
        logits: torch.Tensor | None,
        unused: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> Routing:
        """Apply capacity dropping (if configured) and count the kept slots. unused [T, k]:
        slots the router itself left empty (threshold routing); they take no capacity and
        are not counted as dropped. counts [E] int64: every slot's expert counted already."""
        T, k = expert_ids.shape
        E = self.num_experts
        if unused is None and self.cfg.capacity_factor is None:  # drop-free: nothing to mask
            dropped = torch.zeros_like(expert_ids, dtype=torch.bool)
            tokens_per_expert = count_per_expert(expert_ids, E) if counts is None else counts
            frac = torch.zeros((), device=weights.device)
        elif unused is None and counts is not None and T > 0:  # capacity over every slot
            cap = expert_capacity(T, k, E, self.cfg.capacity_factor)
            dropped = capacity_drop_mask(expert_ids, weights, E, cap, self.cfg.drop_policy,
                                         backend=getattr(self, "backend", "auto"))
            weights = weights.masked_fill(dropped, 0.0)
            tokens_per_expert = counts.clamp(max=cap)  # an expert keeps its first cap slots
            frac = (counts - tokens_per_expert).sum() / (T * k)
        else:
            used = torch.ones_like(expert_ids, dtype=torch.bool) if unused is None else ~unused
            lost = torch.zeros_like(used)
            if self.cfg.capacity_factor is not None and T > 0:
                cap = expert_capacity(T, k, E, self.cfg.capacity_factor)
                lost = capacity_drop_mask(expert_ids, weights, E, cap, self.cfg.drop_policy,
                                          skip=unused, backend=getattr(self, "backend", "auto"))
            dropped = lost | ~used
            weights = weights.masked_fill(dropped, 0.0)
            tokens_per_expert = count_per_expert(expert_ids, E, ~dropped)
            frac = (lost.sum() / used.sum().clamp(min=1)).float() if T > 0 else \
                torch.zeros((), device=weights.device)
        return Routing(
            expert_ids=expert_ids,
            combine_weights=weights,
            dropped=dropped,
            tokens_per_expert=tokens_per_expert,
            aux_loss=aux_loss,
            z_loss=z_loss,
            dropped_fraction=frac,
            router_logits=logits,
            num_experts=E,
            entropy_loss=entropy,
        )


class TopKRouter(Router):
    """Token choice: each token picks its k best experts.

    softmax: scores = softmax(logits); sigmoid: scores = sigmoid(logits). Selection by
    scores (+ expert_bias where configured: DeepSeek-V3 on sigmoid, ERNIE-4.5 on softmax;
    aux-loss-free balancing moves it), weights = the selected scores (renormalised if
    configured) * routed_scaling.
    top_k (and, for threshold routing, threshold) are live values that a k / sparsity
    schedule moves (set_step); they start at the config's.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig,
                 backend: str = "auto"):
        super().__init__(d_model, num_experts, cfg)
        self.backend = backend  # kernel backend of the fused top-k routing
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if cfg.gate_bias else None
        if cfg.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.top_k, self.threshold = cfg.top_k, cfg.threshold
        # aux_loss_type="global_batch": sums [E] slot counts over the data-parallel ranks;
        # parallel/ sets it (the router itself never holds a process group)
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_step(self, step: int) -> None:
        """Move top_k / threshold to their values at training step `step` (0-based) of the
        config's schedule (routing.schedule); no schedule: the config's values."""
        self.top_k, self.threshold = scheduled(self.cfg, step)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """x [T, d] -> Routing with k = top_k slots per token (threshold routing: the slots
        past a token's threshold are dropped)."""
        _check_input(x, self.d_model)
        cfg = self.cfg
        if cfg.aux_loss_type == "sequence" and seq_len is None:
            raise ValueError(
                "aux_loss_type='sequence' needs the sequence length (pass x as [B, S, d])"
            )
        logits = self._gate_logits(x)
        softmax = cfg.score == "softmax"
        seq = seq_len if cfg.aux_loss_type == "sequence" else None
        if cfg.kind == "topk" and cfg.aux_loss_type != "global_batch":
            # the losses of every slot: fused (three kernels on Triton)
            expert_ids, weights, _, unused = self._select(logits, with_probs=False)
            aux, z, entropy, counts = router_losses(logits, expert_ids, cfg.score, softmax,
                                                    self.backend, seq)
            return self._finish(expert_ids, weights, aux, z, logits, unused,
                                entropy if softmax else None, counts)
        expert_ids, weights, probs, unused = self._select(logits)
        used = None if unused is None else ~unused
        if cfg.aux_loss_type == "global_batch":
            aux = global_batch_aux_loss(probs, expert_ids, self.num_experts, used,
                                        self.count_reducer)
        else:
            aux = switch_aux_loss(probs, expert_ids, self.num_experts, seq, used)
        entropy = router_entropy(probs) if softmax else None
        return self._finish(expert_ids, weights, aux, router_z_loss(logits), logits, unused,
                            entropy)

    def _unused(self, probs_k: torch.Tensor) -> torch.Tensor:
        """probs_k [T, k] (best first, not renormalised) -> [T, k] bool: the slots after a
        token's probabilities reach the threshold (its best expert is always used)."""
        before = probs_k.detach().cumsum(-1) - probs_k.detach()
        return before >= self.threshold

    def _renormalize(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [T, k] -> divided by their sum if cfg.renormalize, times routed_scaling."""
        if not self.cfg.renormalize:
            return weights * self.cfg.routed_scaling_factor
        return weights / (weights.sum(-1, keepdim=True) + 1e-20) \
            * self.cfg.routed_scaling_factor

    def _select(self, logits: torch.Tensor, with_probs: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                           torch.Tensor | None]:
        """logits [T, E] -> expert_ids [T, k], combine weights [T, k] (one fused kernel on
        the Triton backend), the probabilities [T, E] the aux loss reads, and (threshold
        routing) the unused slots [T, k] bool, whose weights are 0."""
        cfg = self.cfg
        plain = cfg.kind == "threshold"  # renormalised after dropping the slots past its threshold
        groups = (cfg.n_group, cfg.topk_group, cfg.group_score == "top2") \
            if cfg.n_group > 1 else None
        expert_ids, weights = topk_route(logits, self.top_k, cfg.score,
                                         cfg.renormalize and not plain,
                                         1.0 if plain else cfg.routed_scaling_factor,
                                         self.expert_bias, self.backend, groups)
        probs = None
        if with_probs:
            if cfg.score == "softmax":
                probs = torch.softmax(logits, dim=-1)
            else:
                scores = torch.sigmoid(logits)
                probs = scores / scores.sum(-1, keepdim=True)
        unused = None
        if cfg.kind == "threshold":
            unused = self._unused(weights)
            weights = self._renormalize(weights.masked_fill(unused, 0.0))
        return expert_ids, weights, probs, unused

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> expert_ids [T, k], combine weights [T, k] (float32): inference routing,
        no losses, no capacity (and no host sync unless cfg.validate checks for NaN).
        Threshold routing: the slots past a token's threshold get weight 0."""
        expert_ids, weights, _, _ = self._select(self._gate_logits(x), with_probs=False)
        return expert_ids, weights

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """tokens_per_expert [E] (summed over the step, all ranks) -> bias moved in place."""
        if self.expert_bias is None:
            raise ValueError("this router has no expert_bias (set expert_bias=true)")
        self.expert_bias.copy_(
            aux_free_bias_update(
                self.expert_bias, tokens_per_expert, self.cfg.expert_bias_update_rate
            )
        )


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its C highest-probability tokens.

    C = ceil(c * T / E) with c = capacity_factor (default top_k), so tokens get c experts on
    average; a token may get none (its slots are all dropped) or several. k in the returned
    Routing is the largest number of experts any token got.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__(d_model, num_experts, cfg)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """x [T, d] -> Routing with k = max experts per token, unselected slots dropped."""
        _check_input(x, self.d_model)
        T, E = x.shape[0], self.num_experts
        logits = self._gate_logits(x)
        probs = torch.softmax(logits, dim=-1)
        c = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else self.cfg.top_k
        cap = min(T, math.ceil(c * T / E))
        selected = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        if cap > 0:
            token_idx = torch.topk(probs.detach(), cap, dim=0).indices  # [C, E]
            selected.scatter_(0, token_idx, True)
        k_max = max(1, int(selected.sum(1).max())) if T > 0 else 1
        masked = torch.where(selected, probs.detach(), torch.full_like(probs, -1.0))
        top = torch.topk(masked, k_max, dim=-1)
        expert_ids, dropped = top.indices, top.values < 0
        weights = probs.gather(1, expert_ids).masked_fill(dropped, 0.0)
        tokens_lost = (~selected.any(1)).float().mean() if T > 0 else probs.new_zeros(())
        return Routing(
            expert_ids=expert_ids,
            combine_weights=weights,
            dropped=dropped,
            tokens_per_expert=selected.sum(0),
            aux_loss=probs.new_zeros(()),
            z_loss=router_z_loss(logits),
            dropped_fraction=tokens_lost,
            router_logits=logits,
            num_experts=E,
        )


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): a fixed random map token id -> k distinct experts.

    No parameters; combine weights are 1/k. Needs the token ids of the layer's input.
    """

    def __init__(
        self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: int, seed: int = 0
    ):
        super().__init__(d_model, num_experts, cfg)
        if vocab_size is None or vocab_size < 1:
            raise ValueError("hash routing needs vocab_size >= 1")
        g = torch.Generator().manual_seed(seed)
        table = torch.rand(vocab_size, num_experts, generator=g).argsort(1)[:, : cfg.top_k]
        self.register_buffer("table", table)
        self.vocab_size = vocab_size

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """x [T, d], token_ids [T] -> Routing with fixed experts and weights 1/k."""
        _check_input(x, self.d_model)
        if token_ids is None:
            raise ValueError("hash routing needs the token ids of the input (token_ids=[T])")
        token_ids = token_ids.reshape(-1)
        if token_ids.numel() != x.shape[0]:
            raise ValueError(f"token_ids has {token_ids.numel()} entries for {x.shape[0]} tokens")
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        expert_ids = self.table[token_ids]
        k = self.cfg.top_k
        weights = torch.full(expert_ids.shape, 1.0 / k, dtype=_compute_dtype(x), device=x.device)
        zero = weights.new_zeros(())
        return self._finish(expert_ids, weights, zero, zero, None)


def set_routing_step(model: nn.Module, step: int) -> None:
    """Move every token-choice router in `model` to training step `step` (0-based) of its
    k / sparsity schedule (RouterConfig.schedule_steps)."""
    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.set_step(step)


def build_router(
    cfg: RouterConfig, d_model: int, num_experts: int, vocab_size: int | None = None,
    backend: str = "auto",
) -> Router:
    """RouterConfig -> the router module it names (backend: kernels for top-k routing)."""
    cfg.check(num_experts)
    if cfg.kind in TOKEN_CHOICE:
        return TopKRouter(d_model, num_experts, cfg, backend)
    if cfg.kind == "expert_choice":
        return ExpertChoiceRouter(d_model, num_experts, cfg)
    return HashRouter(d_model, num_experts, cfg, vocab_size)
