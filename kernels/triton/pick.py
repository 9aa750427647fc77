"""Per-shape choice between interchangeable grouped-GEMM implementations (our Triton kernels,
with cp.async or, on sm_90+, TMA tiles; PyTorch's grouped matmul; one cuBLAS GEMM per
expert): on a GPU each is timed once per shape key and the fastest kept.

MOE_GROUPED_GEMM=triton|tma|torch|loop forces one (auto by default; one that does not take a
call's operands falls back to the first, triton); `forced(name)` does the same in code
(benchmarks). Under the interpreter and on the CPU the first candidate (Triton) runs.

Within `without_host_waits()` the implementations that read back to the host (the loop's
rows per expert) are not candidates: a CUDA graph capture cannot hold such a read, and a
serving step that waits there leaves the PCIe link idle while the host cannot issue the next
layer's work.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kernels.triton.common import bench, interpreting

MODES = ("auto", "triton", "tma", "torch", "loop")
WAITS_FOR_HOST = frozenset({"loop"})  # reads the rows per expert back to the host
_choices: dict[tuple, str] = {}
_forced: str | None = None
_no_host_waits = False


def mode() -> str:
    m = _forced or os.environ.get("MOE_GROUPED_GEMM", "auto")
    if m not in MODES:
        raise ValueError(f"MOE_GROUPED_GEMM must be one of {', '.join(MODES)}, got {m!r}")
    return m


@contextmanager
def forced(name: str) -> Iterator[None]:
    """Within the block, every grouped GEMM uses implementation `name` (or "auto")."""
    global _forced
    if name not in MODES:
        raise ValueError(f"implementation must be one of {', '.join(MODES)}, got {name!r}")
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


@contextmanager
def without_host_waits() -> Iterator[None]:
    """Within the block, grouped GEMMs pick among the implementations that do not wait for
    the device (not WAITS_FOR_HOST; a forced one is still used)."""
    global _no_host_waits
    saved, _no_host_waits = _no_host_waits, True
    try:
        yield
    finally:
        _no_host_waits = saved


def choices() -> dict[tuple, str]:
    """The implementation chosen for each shape key so far (for benchmark reports)."""
    return dict(_choices)


def run(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], device: torch.device,
        timer: Callable[[Callable[[], object]], float] | None = None) -> torch.Tensor:
    """The result of the candidate chosen for `key`: the forced one, else on CUDA (or with a
    `timer` given) the fastest, each timed once per key by `timer` (default: common.bench),
    else the first; within without_host_waits(), of those that do not wait for the host."""
    m = mode()
    if _no_host_waits and m == "auto":
        candidates = {n: fn for n, fn in candidates.items() if n not in WAITS_FOR_HOST}
        key = (*key, "no host waits")
    if m != "auto":
        name = m if m in candidates else next(iter(candidates))
    elif timer is None and (interpreting() or device.type != "cuda"):
        name = next(iter(candidates))
    else:
        name = _choices.get(key)
        if name is None:
            timer = timer or bench
            times, errors = {}, {}
            for n, fn in candidates.items():
                try:
                    times[n] = timer(fn)
                except Exception as e:  # noqa: BLE001 - a candidate that cannot run is skipped
                    errors[n] = e
            if not times:
                raise next(iter(errors.values()))
            for n, e in errors.items():
                warnings.warn(f"grouped GEMM {key[:3]}: {n} failed ({type(e).__name__}: {e}); "
                              "using the others", RuntimeWarning, stacklevel=2)
            name = min(times, key=times.get)
            _choices[key] = name
    return candidates[name]()
