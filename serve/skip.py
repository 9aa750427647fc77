"""Light missing experts (ServeConfig.skip_miss_weight, miss_quant_weight), approximations
that offloaded serving trades for PCIe bytes (as AdapMoE and HOBBIT do for Mixtral): an
expert that is not on the device, and that every (token, expert) pair of the step using it
weighs below a bar (and not as its token's first choice), is light. Skipping leaves it out:
its pairs get weight 0 and each such token's other experts are scaled up to keep its total
routed weight (a top-2 Mixtral token then takes its first expert whole); no token loses all
its experts. A low-precision stand-in runs it from an int8 / int4 copy instead, 2-4x fewer
bytes. The prefetcher copies ahead only the predicted experts such pairs would keep. Off
(bar 0) the runtime is exact.
"""

from __future__ import annotations

import torch


def kept_pairs(w: torch.Tensor, bar: float) -> torch.Tensor:
    """weights [T, k] -> [T, k] bool: the pairs that keep their expert, however missing (a
    weight of at least bar, or the token's heaviest)."""
    return (w >= bar) | (w == w.max(-1, keepdim=True).values)


def light_missing(routes: list[tuple[torch.Tensor, torch.Tensor]], missing: list[int],
                  bar: float, num_experts: int) -> set[int]:
    """routes: (expert ids [T, k], weights [T, k]) per chunk of one layer's step; missing:
    the experts that are not resident -> those of them that each pair using weighs below
    bar, as not its token's heaviest."""
    if not missing or bar <= 0:
        return set()
    ids0 = routes[0][0]
    keep = torch.zeros(num_experts, device=ids0.device)  # 1: some pair must have it
    for ids, w in routes:
        must = kept_pairs(w, bar).reshape(-1).float()
        keep.scatter_reduce_(0, ids.reshape(-1), must, "amax")
    miss = torch.tensor(missing, device=ids0.device)
    return set(miss[keep[miss] == 0].tolist())


def skip_missing(routes: list[tuple[torch.Tensor, torch.Tensor]], missing: list[int],
                 bar: float, num_experts: int
                 ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], set[int]]:
    """routes, missing as light_missing -> (the routes with the light experts' pairs at
    weight 0 and their tokens' other weights scaled to the same sum, the skipped (light)
    experts)."""
    skipped = light_missing(routes, missing, bar, num_experts)
    if not skipped:
        return routes, skipped
    gone = torch.tensor(sorted(skipped), device=routes[0][0].device)
    out = []
    for ids, w in routes:
        drop = torch.isin(ids, gone)
        kept = w.masked_fill(drop, 0)
        left = kept.sum(-1, keepdim=True)  # > 0 unless the token's weights were all 0
        scale = torch.where(left > 0, w.sum(-1, keepdim=True) / left, 1.0)
        out.append((ids, kept * scale))
    return out, skipped
