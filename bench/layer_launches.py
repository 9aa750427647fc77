"""What the host does for one MoE layer's forward and backward on the Triton backend: the
device kernels it launches (torch ops that run one, Triton kernels) and the times it waits
for the device (ops that read device data back). Counted on the CPU, the kernels under
Triton's interpreter; the launch sequence is the one a GPU gets, so a launch or wait removed
here is one removed there (each costs microseconds of host time, and a wait lets the GPU run
dry). No timing: counts.

    python -m bench.layer_launches
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import append_results, command_line, markdown_table

# ops that only make a view or allocate: no kernel
NO_KERNEL = {"view", "_unsafe_view", "slice", "t", "transpose", "unsqueeze", "squeeze",
             "detach", "expand", "as_strided", "empty", "empty_like", "new_empty",
             "empty_strided", "alias", "select", "permute", "split", "split_with_sizes",
             "_reshape_alias", "lift_fresh", "unbind", "diagonal", "reshape"}
# ops whose output size or value is read on the host (bincount: its largest id, on CUDA)
WAITS = {"nonzero", "_local_scalar_dense", "bincount", "masked_select", "unique", "_unique",
         "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "is_nonzero",
         "equal", "allclose"}
# composite ops with a CUDA kernel of their own: one launch there
FUSED_ON_CUDA = {torch.nn.functional.rms_norm, torch.rms_norm}
CASES = {  # name: (d, E, ffn, router config)
    "Mixtral-like: E=8, k=2, softmax": (64, 8, 32, dict(top_k=2)),
    "fine-grained: E=128, k=8, softmax": (64, 128, 16, dict(top_k=8)),
    "DeepSeek-like: E=64, k=6, sigmoid, 8 groups, bias": (
        64, 64, 16, dict(top_k=6, score="sigmoid", expert_bias=True, n_group=8, topk_group=4,
                         group_score="top2", routed_scaling_factor=2.5)),
    "E=8, k=2, capacity 1.0": (64, 8, 32, dict(top_k=2, capacity_factor=1.0)),
}


class HostWait(AssertionError):
    """An op waited for the device (raised by counting(raise_on_wait=True))."""


class _Counter(TorchDispatchMode):
    def __init__(self, raise_on_wait: bool):
        super().__init__()
        self.ops: Counter = Counter()
        self.in_kernel = 0
        self.raise_on_wait = raise_on_wait

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                          else ()))
            if name in WAITS or bool_index:
                if self.raise_on_wait:
                    raise HostWait(f"{name} waits for the device, at {_caller()}")
                self.ops["wait"] += 1
            if name not in NO_KERNEL:
                self.ops["torch"] += 1
        return func(*args, **(kwargs or {}))


class _FusedOnCuda(TorchFunctionMode):
    """Counts a call of FUSED_ON_CUDA as the one kernel it is on CUDA (on the CPU it runs
    as the ops it decomposes into, which the dispatch counter then does not count)."""

    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in FUSED_ON_CUDA or self.counter.in_kernel:
            return func(*args, **(kwargs or {}))
        self.counter.ops["torch"] += 1
        self.counter.in_kernel += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.in_kernel -= 1


def _caller() -> str:
    """The innermost frame of this project's code (not torch's, not this module's)."""
    ours = [f for f in traceback.extract_stack()[:-2]
            if "site-packages" not in f.filename and not f.filename.endswith(__file__)]
    return f"{ours[-1].filename}:{ours[-1].lineno}: {ours[-1].line}" if ours else "?"


@contextmanager
def counting(raise_on_wait: bool = False) -> Iterator[Counter]:
    """Within it, count device launches: the yielded Counter's "torch" (torch ops that run a
    kernel on CUDA; FUSED_ON_CUDA calls count one), "triton" (Triton launches; the ops
    Triton's CPU interpreter runs inside one are not counted; "triton:<name>" per kernel)
    and "wait" (ops that wait for the device; raise_on_wait: raise HostWait naming where,
    instead)."""
    from triton.runtime import interpreter

    counter = _Counter(raise_on_wait)
    call = interpreter.GridExecutor.__call__

    def kernel(self, *args, **kwargs):
        counter.ops["triton"] += 1
        counter.ops[f"triton:{getattr(self.fn, '__name__', self.fn)}"] += 1
        counter.in_kernel += 1
        try:
            return call(self, *args, **kwargs)
        finally:
            counter.in_kernel -= 1

    interpreter.GridExecutor.__call__ = kernel
    try:
        with counter, _FusedOnCuda(counter):
            yield counter.ops
    finally:
        interpreter.GridExecutor.__call__ = call


def use_interpreter(bench: str) -> None:
    """Run Triton's kernels under its CPU interpreter (set before triton is imported)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            sys.exit(f"{bench} runs the kernels under Triton's interpreter: set "
                     "TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"


def count(d: int, E: int, ffn: int, router: dict, tokens: int = 64) -> Counter:
    """One forward + backward of a layer (after a warm-up one) -> Counter(torch=, triton=,
    wait=)."""
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    torch.manual_seed(0)
    layer = MoELayer(d, MoEConfig(num_experts=E, expert_ffn=ffn, kernel_backend="triton",
                                  router=RouterConfig(validate=False, **router)))
    x = torch.randn(tokens, d, requires_grad=True)
    dy = torch.randn(tokens, d)

    def step():
        out, routing = layer(x)
        ((out * dy).sum() + routing.aux_loss + routing.z_loss).backward()

    step()
    with counting() as ops:
        step()
    return ops


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="this commit", help="names the code measured")
    p.add_argument("--tokens", type=int, default=64,
                   help="tokens a step (the counts do not depend on it; fewer run faster)")
    p.add_argument("--max-experts", type=int, default=None,
                   help="run each case with at most this many experts (the counts do not "
                        "depend on E; the interpreter runs a program per expert: tests)")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    use_interpreter("bench.layer_launches")
    rows = []
    for name, (d, E, ffn, router) in CASES.items():
        if a.max_experts and E > a.max_experts:
            E, name = a.max_experts, f"{name} (run with E={a.max_experts})"
        c = count(d, E, ffn, router, a.tokens)
        rows.append([a.label, name, str(c["torch"] + c["triton"]), str(c["torch"]),
                     str(c["triton"]), str(c["wait"])])
        print(f"| {' | '.join(rows[-1])} |", file=sys.stderr, flush=True)
    body = ("One MoE layer's forward and backward (aux and z losses included, validate=False, "
            f"{a.tokens} tokens, after a warm-up step) on the Triton backend: device kernels "
            "the host launches, and ops that wait for the device.\n\n" + markdown_table(
                ["code", "layer", "launches", "torch ops", "Triton kernels", "host waits"],
                rows) + "\n")
    print(body)
    append_results(a.out, "Kernel launches and host waits per MoE layer step "
                   "(bench/layer_launches.py)", command_line("bench.layer_launches", argv),
                   torch.device("cpu"), body)


if __name__ == "__main__":
    main()
