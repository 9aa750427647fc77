"""A check that code never waits for the device: ops that read device data back to the host
(an item, a data-dependent output size) fail while `no_host_sync()` is on. Torch ops that
Triton's CPU interpreter runs inside a kernel launch are not the code's own and pass."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# output size or value read on the host (on CUDA, bincount reads its largest id back)
SYNCING = {"nonzero", "_local_scalar_dense", "bincount", "masked_select", "unique",
           "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave",
           "is_nonzero", "equal", "allclose"}


class HostSync(AssertionError):
    pass


def _bool_index(name: str, args) -> bool:
    """x[mask] / x[mask] = v with a bool mask: an output size only the device knows."""
    if name not in ("index", "index_put", "index_put_") or len(args) < 2:
        return False
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] or ())


class _Check(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_kernel and (name in SYNCING or _bool_index(name, args)):
            ours = [f for f in traceback.extract_stack()[:-1]
                    if "site-packages" not in f.filename and "host_sync" not in f.filename]
            where = f"{ours[-1].filename}:{ours[-1].lineno}: {ours[-1].line}" if ours else "?"
            raise HostSync(f"{name} waits for the device, at {where}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Within it, an op that syncs with the device raises HostSync naming where it ran."""
    check = _Check()
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__

    def kernel(self, *args, **kwargs):  # the interpreter's own torch ops
        check.in_kernel += 1
        try:
            return call(self, *args, **kwargs)
        finally:
            check.in_kernel -= 1

    interpreter.GridExecutor.__call__ = kernel
    try:
        with check:
            yield
    finally:
        interpreter.GridExecutor.__call__ = call
