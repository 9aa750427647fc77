"""Routers, load-balancing losses, capacity and token dropping.

x [T, d] -> router -> `Routing` (expert ids, combine weights, dropped mask, tokens per expert,
aux / z losses). See DESIGN.md, "The path of a token through an MoE layer".
"""

from routing.capacity import capacity_drop_mask, expert_capacity
from routing.config import RouterConfig
from routing.losses import aux_free_bias_update, router_z_loss, switch_aux_loss
from routing.routers import ExpertChoiceRouter, HashRouter, Router, TopKRouter, build_router
from routing.types import Routing

__all__ = [
    "ExpertChoiceRouter",
    "HashRouter",
    "Router",
    "RouterConfig",
    "Routing",
    "TopKRouter",
    "aux_free_bias_update",
    "build_router",
    "capacity_drop_mask",
    "expert_capacity",
    "router_z_loss",
    "switch_aux_loss",
]
