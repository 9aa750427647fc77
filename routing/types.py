"""The `Routing` record every router returns and the rest of the code consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Where each token goes, with what weight, and the losses of that decision.

    T tokens, k slots per token, E experts. A slot that does not dispatch (dropped by
    capacity, or a padding slot of expert-choice routing) has ``dropped=True`` and weight 0.
    """

    expert_ids: torch.Tensor  # [T, k] int64, in [0, E)
    combine_weights: torch.Tensor  # [T, k] float, 0 where dropped
    dropped: torch.Tensor  # [T, k] bool
    tokens_per_expert: torch.Tensor  # [E] int64, kept (dispatched) slots per expert
    aux_loss: torch.Tensor  # scalar, unscaled load-balancing loss (0 if the router has none)
    z_loss: torch.Tensor  # scalar, unscaled router z-loss (0 if the router has no logits)
    dropped_fraction: torch.Tensor  # scalar: share of selected slots (top-k) or tokens (EC) lost
    router_logits: torch.Tensor | None = None  # [T, E] raw gate logits, when the router has any
    num_experts: int = 0
    entropy_loss: torch.Tensor | None = None  # scalar mean entropy of softmax router probs

    @property
    def experts_per_token(self) -> torch.Tensor:
        """Scalar: the mean number of experts a token was sent to (k unless slots dropped)."""
        T = max(self.num_tokens, 1)
        return (~self.dropped).sum() / T

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]
