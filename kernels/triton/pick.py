"""Per-shape choice between interchangeable grouped-GEMM implementations (our Triton kernels,
with cp.async or, on sm_90+, TMA tiles; PyTorch's grouped matmul; one cuBLAS GEMM per
expert): on a GPU each is timed once per shape key and the fastest kept.

MOE_GROUPED_GEMM=triton|tma|torch|loop forces one (auto by default; one that does not take a
call's operands falls back to the first, triton); `forced(name)` does the same in code
(benchmarks). Under the interpreter and on the CPU the first candidate (Triton) runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kernels.triton.common import interpreting

MODES = ("auto", "triton", "tma", "torch", "loop")
_choices: dict[tuple, str] = {}
_forced: str | None = None


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


def choices() -> dict[tuple, str]:
    """The implementation chosen for each shape key so far (for benchmark reports)."""
    return dict(_choices)


def run(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], device: torch.device,
        timer: Callable[[Callable[[], object]], float] | None = None) -> torch.Tensor:
    """The result of the candidate chosen for `key`: the forced one, else on CUDA (or with a
    `timer` given) the fastest, each timed once per key by `timer` (default: triton's
    do_bench), else the first."""
    m = mode()
    if m != "auto":
        name = m if m in candidates else next(iter(candidates))
    elif timer is None and (interpreting() or device.type != "cuda"):
        name = next(iter(candidates))
    else:
        name = _choices.get(key)
        if name is None:
            if timer is None:
                import triton.testing

                def timer(fn):
                    return triton.testing.do_bench(fn, warmup=5, rep=20)

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
