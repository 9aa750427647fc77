"""Typed router configuration (filled by Hydra in `train/`, by hand elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("topk", "threshold", "expert_choice", "hash")
TOKEN_CHOICE = ("topk", "threshold")  # kinds that pick each token's experts from its logits


@dataclass
class RouterConfig:
    """How tokens are assigned to experts.

    kind: "topk" (token choice), "threshold" (top-p token choice: each token takes its most
        probable experts until their softmax probabilities sum to at least `threshold`, at most
        top_k of them; Huang et al. 2024), "expert_choice" (each expert picks its tokens) or
        "hash".
    score: "softmax" (Mixtral, Qwen-MoE, OLMoE) or "sigmoid" (DeepSeek-V3) for kind="topk";
        threshold routing is over softmax probabilities.
    renormalize: divide the k selected weights by their sum (Mixtral, Qwen3: true; Qwen2, OLMoE:
        false).
    capacity_factor: None = drop-free. For top-k, each expert keeps at most
        ceil(capacity_factor * T * k / E) slots; for expert choice, each expert takes
        ceil(capacity_factor * T / E) tokens (None there means capacity_factor = top_k).
    drop_policy: which slots survive an over-full expert: "position" (first choices before
        second choices, then token order, as GShard / Switch) or "probs" (highest weight first).
    aux_loss_type: "micro_batch", "sequence" (Switch loss averaged over sequences) or
        "global_batch" (the expert frequencies f_i over every data-parallel rank's tokens of
        this micro-batch, the probabilities P_i this rank's: global-batch balancing, Qiu et
        al. 2025, as Qwen3-MoE trains; one process: the same as micro_batch).
    expert_bias: a per-expert bias added to the scores for selection only, never to the
        combine weights: DeepSeek-V3's on sigmoid scores, ERNIE-4.5's on softmax ones.
    expert_bias_update_rate: the aux-loss-free balancing step gamma of that bias;
    routed_scaling_factor: multiplies combine weights (DeepSeek-V3).
    n_group, topk_group: group-limited routing (DeepSeek-V2 / V3): the experts form n_group
        equal groups, each token picks its topk_group best groups and its k experts among
        them; a group's score is its best expert score (group_score="max", V2) or the sum of
        its two best (group_score="top2", V3, with the expert bias).
    gate_bias: a learned bias on the gate's logits (GPT-OSS).
    entropy_loss_coef: weight of the mean entropy of the router's softmax (the "dynamic loss"
        that keeps threshold routing from spreading a token over many experts).
    schedule_steps, top_k_start, threshold_start: a k / sparsity schedule: top_k (and the
        threshold) move linearly from their *_start values at step 0 to top_k (threshold) at
        step schedule_steps, then stay (e.g. dense-to-sparse: top_k_start = num_experts).
        routing.schedule applies it; the config itself never changes.
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
    threshold: float = 0.4
    entropy_loss_coef: float = 0.0
    schedule_steps: int = 0
    top_k_start: int | None = None
    threshold_start: float | None = None
    validate: bool = True

    def check(self, num_experts: int) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.kind not in KINDS:
            raise ValueError(f"router kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
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
        if self.aux_loss_type not in ("micro_batch", "sequence", "global_batch"):
            raise ValueError("aux_loss_type must be micro_batch, sequence or global_batch, got "
                             f"{self.aux_loss_type!r}"
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
        if self.gate_bias and self.kind not in TOKEN_CHOICE:
            raise ValueError("gate_bias needs kind=topk or threshold")
        if self.kind == "threshold":
            if not 0 < self.threshold <= 1:
                raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
            if self.score != "softmax":
                raise ValueError("threshold routing sums softmax probabilities: score=softmax")
        if self.entropy_loss_coef < 0 or (self.entropy_loss_coef and (
                self.kind not in TOKEN_CHOICE or self.score != "softmax")):
            raise ValueError(f"entropy_loss_coef={self.entropy_loss_coef} needs to be >= 0, "
                             "and > 0 only with a softmax topk or threshold router")
        self._check_schedule(num_experts)

    def _check_schedule(self, num_experts: int) -> None:
        if self.schedule_steps < 0:
            raise ValueError(f"schedule_steps must be >= 0, got {self.schedule_steps}")
        starts = {"top_k_start": self.top_k_start, "threshold_start": self.threshold_start}
        given = [n for n, v in starts.items() if v is not None]
        if given and self.kind not in TOKEN_CHOICE:
            raise ValueError(f"{given[0]} (a k / sparsity schedule) needs kind=topk or "
                             f"threshold, got {self.kind!r}")
        if given and self.schedule_steps == 0:
            raise ValueError(f"{given[0]} is set but schedule_steps=0: give the steps the "
                             "schedule takes")
        if self.top_k_start is not None and not 1 <= self.top_k_start <= num_experts:
            raise ValueError(f"top_k_start={self.top_k_start} must be between 1 and "
                             f"num_experts={num_experts}")
        if self.threshold_start is not None and (self.kind != "threshold"
                                                 or not 0 < self.threshold_start <= 1):
            raise ValueError(f"threshold_start={self.threshold_start} needs kind=threshold "
                             "and a value in (0, 1]")
        if self.n_group > 1 and self.top_k_start is not None and self.top_k_start > \
                self.topk_group * (num_experts // self.n_group):
            raise ValueError(f"top_k_start={self.top_k_start} exceeds the experts of "
                             f"topk_group={self.topk_group} groups")
        if self.expert_bias and self.kind != "topk":
            raise ValueError("expert_bias (a selection bias) needs kind=topk")
