"""Compile the Triton kernels for a GPU that is not here, and read what each build uses.

Under `compile_only(arch)` every launch of a Triton kernel is compiled through Triton's own
argument binder (the same specialisation a real launch gets: pointer alignment, strides
divisible by 16, sizes of 1), ahead of time for `sm_<arch>`, and not run: outputs are left
as allocated. An autotuned kernel is compiled once per config. `usage` reads a build: its
registers, spills (local memory), shared memory, and which tensor-core instruction its dots
became (wgmma on Hopper, mma.sync before). CPU-only machines (CI) check with it that every
kernel builds for the GPU it is for, without spills or more shared memory than it has.

The process must not run Triton's interpreter (TRITON_INTERPRET unset before triton is
imported): interpreted kernels have nothing to compile.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from kernels.triton.common import interpreting

# Most shared memory one block may use (opt-in), bytes, by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class Build:
    """One compiled kernel: its name, the meta-parameters it was built with, and what the
    build uses. regs / spill_bytes / shared_bytes from the cubin; mma: "wgmma", "mma" or ""
    (no tensor-core dot); mma_overlap: a wgmma stays in flight while the next is issued
    (wgmma.wait_group N > 0); loads: how tiles reach shared memory, "tma" (bulk tensor
    copies), "cp.async" (asynchronous copies, software-pipelined) or "" (through registers)."""

    kernel: str
    meta: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    regs: int
    spill_bytes: int
    mma: str
    mma_overlap: bool = False
    loads: str = ""
    arch: int = 90


class _OfflineDriver:
    """Stands in for Triton's CUDA driver: device 0, stream 0, the target we compile for."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def usage(kernel, name: str, meta: dict, arch: int) -> Build:
    """What the compiled kernel (Triton's CompiledKernel) uses."""
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if res is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {name}:\n{out}")
    regs, stack, static_shared, local = (int(v) for v in res.groups())
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else ""
    overlap = any(int(n) > 0 for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)",
                                                    ptx))
    loads = ("tma" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async." in ptx
             else "")
    md = kernel.metadata
    return Build(name, meta, md.num_warps, md.num_stages, md.shared + static_shared, regs,
                 stack + local, mma, overlap, loads, arch)


@contextmanager
def compile_only(arch: int = 90) -> Iterator[list[Build]]:
    """Within it, Triton kernel launches compile for sm_<arch> and do not run; yields the
    list of their builds, filled as launches happen."""
    if interpreting():
        raise RuntimeError("compile_only needs Triton's compiler: unset TRITON_INTERPRET "
                           "before triton is imported")
    builds: list[Build] = []
    run, tuned = JITFunction.run, Autotuner.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        meta = {k: v for k, v in kwargs.items() if k.isupper()}
        builds.append(usage(kernel, self.fn.__name__, meta, arch))
        return kernel

    def compile_configs(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            if config.pre_hook is not None:  # e.g. a TMA descriptor's box is the config's tile
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            self.fn.run(*args, **kwargs, **config.all_kwargs(), grid=None, warmup=True)
        self.nargs = None

    before = driver.active if driver._active is not None else None
    driver.set_active(_OfflineDriver(arch))
    JITFunction.run, Autotuner.run = compile_run, compile_configs
    try:
        yield builds
    finally:
        JITFunction.run, Autotuner.run = run, tuned
        if before is None:
            driver._active = None
        else:
            driver.set_active(before)
