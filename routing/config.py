"""Typed router configuration (filled by Hydra in `train/`, by hand elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RouterConfig:
    """How tokens are assigned to experts.

    kind: "topk" (token choice), "expert_choice" (each expert picks its tokens) or "hash".
    score: "softmax" (Mixtral, Qwen-MoE, OLMoE) or "sigmoid" (DeepSeek-V3) for kind="topk".
    renormalize: divide the k selected weights by their sum (Mixtral, Qwen3: true; Qwen2, OLMoE:
        false).
    capacity_factor: None = drop-free. For top-k, each expert keeps at most
        ceil(capacity_factor * T * k / E) slots; for expert choice, each expert takes
        ceil(capacity_factor * T / E) tokens (None there means capacity_factor = top_k).
    drop_policy: which slots survive an over-full expert: "position" (first choices before
        second choices, then token order, as GShard / Switch) or "probs" (highest weight first).
    aux_loss_type: "micro_batch" or "sequence" (Switch loss averaged over sequences).
    expert_bias_update_rate: DeepSeek-V3 aux-loss-free balancing step gamma (sigmoid router);
        the bias only changes selection, never the combine weights.
    routed_scaling_factor: multiplies combine weights (DeepSeek-V3).
    n_group, topk_group: group-limited routing (DeepSeek-V2 / V3): the experts form n_group
        equal groups, each token picks its topk_group best groups and its k experts among
        them; a group's score is its best expert score (group_score="max", V2) or the sum of
        its two best (group_score="top2", V3, with the expert bias).
    gate_bias: a learned bias on the gate's logits (GPT-OSS).
    """

    kind: str = "topk"
    top_k: int = 2
    score: str = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    drop_policy: str = "position"
    aux_loss_coef: float = 0.01
    aux_loss_type: str = "micro_batch"
    z_loss_coef: float = 0.001
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    gate_bias: bool = False
    validate: bool = True

    def check(self, num_experts: int) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.kind not in ("topk", "expert_choice", "hash"):
            raise ValueError(f"router kind must be topk, expert_choice or hash, got {self.kind!r}")
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score must be softmax or sigmoid, got {self.score!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and num_experts={num_experts}"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.drop_policy not in ("position", "probs"):
            raise ValueError(f"drop_policy must be position or probs, got {self.drop_policy!r}")
        if self.aux_loss_type not in ("micro_batch", "sequence"):
            raise ValueError(
                f"aux_loss_type must be micro_batch or sequence, got {self.aux_loss_type!r}"
            )
        if self.n_group > 1:
            if self.kind != "topk" or num_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} needs kind=topk and num_experts="
                                 f"{num_experts} divisible by it")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be between 1 and "
                                 f"n_group={self.n_group}")
            if self.top_k > self.topk_group * (num_experts // self.n_group):
                raise ValueError(f"top_k={self.top_k} exceeds the experts of topk_group="
                                 f"{self.topk_group} groups")
            if self.group_score not in ("max", "top2"):
                raise ValueError(f"group_score must be max or top2, got {self.group_score!r}")
            if self.group_score == "top2" and num_experts // self.n_group < 2:
                raise ValueError("group_score=top2 needs at least 2 experts per group")
        if self.gate_bias and self.kind != "topk":
            raise ValueError("gate_bias needs kind=topk")
        if self.expert_bias and (self.kind != "topk" or self.score != "sigmoid"):
            raise ValueError("expert_bias (aux-loss-free balancing) needs kind=topk, score=sigmoid")
