"""Routers, load-balancing losses, capacity and token dropping.

x [T, d] -> router -> `Routing` (expert ids, combine weights, dropped mask, tokens per expert,
aux / z / entropy losses); top-k, threshold (top-p), expert-choice and hash routers; k /
sparsity schedules. See DESIGN.md, "The path of a token through an MoE layer".
"""

from routing.capacity import capacity_drop_mask, expert_capacity
from routing.config import RouterConfig
from routing.losses import aux_free_bias_update, router_entropy, router_z_loss, switch_aux_loss
from routing.routers import (
    ExpertChoiceRouter,
    HashRouter,
    Router,
    TopKRouter,
    build_router,
    set_routing_step,
)
from routing.schedule import scheduled
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
    "router_entropy",
    "router_z_loss",
    "scheduled",
    "set_routing_step",
    "switch_aux_loss",
]
