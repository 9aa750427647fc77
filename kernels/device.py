"""What a device can do: peak dense FLOP/s and memory bandwidth, from vendor datasheets for
known GPUs, else measured here (the best of several timed runs, so that a busy machine does
not make the peak look low). MFU in training and S-MFU / S-MBU in serving divide by these."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

# Dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (bytes/s), from vendor sheets.
DATASHEET = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12),
             "L40S": (362e12, 0.864e12), "A10": (125e12, 0.6e12)}


def _datasheet(device: torch.device) -> tuple[tuple[float, float], str] | None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DATASHEET.items():
            if key in name:
                return peaks, f"{name} datasheet"
    return None


def _best_rate(work: float, fn: Callable[[], None], device: torch.device,
               rounds: int = 5, reps: int = 3) -> float:
    """work units per second of fn(), the best of `rounds` timings of `reps` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    best = 0.0
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = max(best, reps * work / (time.perf_counter() - t0))
    return best


@functools.cache
def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): datasheet, or a measured fp32 1024^3 matmul
    (measured once a process)."""
    known = _datasheet(device)
    if known is not None:
        return known[0][0], known[1]
    a = torch.randn(1024, 1024, device=device)
    return _best_rate(2 * 1024**3, lambda: a @ a, device), "measured (fp32 matmul)"


@functools.cache
def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    """(peak memory bytes/s, where it comes from): datasheet, or a measured 64 MiB copy
    (measured once a process)."""
    known = _datasheet(device)
    if known is not None:
        return known[0][1], known[1]
    src = torch.empty(64 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return _best_rate(2 * src.nbytes, lambda: dst.copy_(src), device), "measured (copy)"


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast computes matmuls in on x's device, or None outside autocast
    (mixed precision: float32 weights, bf16 compute)."""
    kind = x.device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
