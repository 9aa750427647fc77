"""k / sparsity schedules: top_k and the threshold of threshold routing as functions of the
training step (linear from their *_start values to the config's over schedule_steps)."""

from __future__ import annotations

import math

from routing.config import RouterConfig


def scheduled(cfg: RouterConfig, step: int) -> tuple[int, float]:
    """(top_k, threshold) at training step `step` (0-based): the *_start values at step 0,
    the config's top_k / threshold from step schedule_steps on, linear in between (top_k
    rounded half up)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    f = min(step / cfg.schedule_steps, 1.0) if cfg.schedule_steps else 1.0
    k, p = cfg.top_k, cfg.threshold
    if cfg.top_k_start is not None:
        k = math.floor(cfg.top_k_start + (cfg.top_k - cfg.top_k_start) * f + 0.5)
    if cfg.threshold_start is not None:
        p = cfg.threshold_start + (cfg.threshold - cfg.threshold_start) * f
    return k, p
