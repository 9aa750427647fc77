"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests): use one small config, no autotuning."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotune block shapes on a GPU; MOE_TRITON_AUTOTUNE=0 (tests) keeps the first config."""
    return not interpreting() and os.environ.get("MOE_TRITON_AUTOTUNE", "1") != "0"


def bench(fn, quantiles=None, warmup_ms: float = 5, rep_ms: float = 20):
    """Milliseconds of fn() on the current CUDA stream, timed with CUDA events (the median,
    or a list at `quantiles`), for the autotuners and the grouped-GEMM picker. Unlike
    triton.testing.do_bench it allocates nothing of its own: do_bench clears the L2 through
    a 256 MiB buffer, which a serving runtime's memory budget would pay at each new shape."""
    fn()
    torch.cuda.synchronize()
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    for _ in range(5):
        fn()
    last.record()
    last.synchronize()
    est = max(first.elapsed_time(last) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(1, min(1000, int(rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for a, b in zip(starts, ends, strict=True):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return pick_quantiles(sorted(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)),
                          quantiles)


def pick_quantiles(times: list[float], quantiles=None):
    """The median of sorted `times`, or a list of their values at `quantiles` (nearest
    rank), as triton.testing.do_bench returns them."""
    def at(q: float) -> float:
        return times[min(len(times) - 1, max(0, round(q * (len(times) - 1))))]
    return at(0.5) if quantiles is None else [at(q) for q in quantiles]


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 dots unless torch allows tf32 matmuls; 16-bit inputs use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# Tests set this to fill every output buffer with NaN first, so unwritten elements show.
POISON_OUTPUTS = False


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, NaN-filled when POISON_OUTPUTS is set."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def empty_index(*shape: int, device: torch.device) -> torch.Tensor:
    """torch.empty int64, -1-filled when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, -1, dtype=torch.int64, device=device)
    return torch.empty(*shape, dtype=torch.int64, device=device)


# The CPU interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even), which
# biases every bf16 result by about -0.3%; under the interpreter, round by hand.
_EMULATE_RNE = tl.constexpr(interpreting())


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """x (float32) -> dtype, rounding to nearest even."""
    if _EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def swiglu_grads(da, g, u, s):
    """SwiGLU's backward (float32): the output gradient da and h's gate g and up u, with
    s = sigmoid(g) -> (d gate, d up)."""
    return da * u * s * (1.0 + g * (1.0 - s)), da * g * s


@triton.jit
def row_index(pair_idx, rows, mask, GROUPED: tl.constexpr, FAN_OUT: tl.constexpr):
    """Rows of an operand for sorted rows `rows`: themselves when the operand is grouped,
    else row sorted_pair_idx // FAN_OUT (token order: FAN_OUT = k; slot order: 1)."""
    if GROUPED:
        return rows
    else:
        return tl.load(pair_idx + rows, mask=mask, other=0) // FAN_OUT


@triton.jit
def swizzle(pid, num_a, num_b, GROUP: tl.constexpr):
    """Linear program id -> (a, b) tile, walking GROUP rows of a at a time down b, so that the
    programs resident at once share their a- and b-operand tiles in L2 (the grouped order of
    Triton's matmul tutorial). num_a, num_b: tile counts along a and b."""
    width = GROUP * num_b
    first_a = (pid // width) * GROUP
    size_a = tl.minimum(num_a - first_a, GROUP)
    a = first_a + (pid % width) % size_a
    b = (pid % width) // size_a
    return a, b
