"""Backend selection: one function API, a torch reference and (on CUDA) Triton kernels."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


def get_backend(name: str, device: torch.device) -> ModuleType:
    """'auto' | 'torch' | 'triton' -> the module that implements the grouped primitives."""
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return importlib.import_module("kernels.reference")
    if not _triton_available():
        raise ValueError("kernel backend 'triton' requested but triton is not importable")
    try:
        return importlib.import_module("kernels.triton_backend")
    except ModuleNotFoundError as e:
        raise ValueError("the triton backend is not built yet (kernels/triton_backend.py)") from e


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
