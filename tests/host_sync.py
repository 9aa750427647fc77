"""A check that code never waits for the device: ops that read device data back to the host
(an item, a data-dependent output size) fail while `no_host_sync()` is on. Torch ops that
Triton's CPU interpreter runs inside a kernel launch are not the code's own and pass. The
counting is bench/layer_launches.py's."""

from __future__ import annotations

from contextlib import AbstractContextManager

from bench.layer_launches import HostWait as HostSync
from bench.layer_launches import counting

__all__ = ["HostSync", "no_host_sync"]


def no_host_sync() -> AbstractContextManager:
    """Within it, an op that waits for the device raises HostSync naming where it ran."""
    return counting(raise_on_wait=True)
