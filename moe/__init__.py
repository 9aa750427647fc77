"""Experts, the MoE layer, shared experts and the MoE transformer LM."""

from moe.config import ModelConfig, MoEConfig
from moe.experts import Experts
from moe.layer import MoELayer, SharedExperts
from moe.model import LMOutput, MoETransformer

__all__ = [
    "Experts",
    "LMOutput",
    "ModelConfig",
    "MoEConfig",
    "MoELayer",
    "MoETransformer",
    "SharedExperts",
]
