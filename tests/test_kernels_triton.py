"""Triton kernels against the float64 torch reference (interpreter on CPU, real on CUDA).

Fresh random inputs each run (the seed is in every failure message); output buffers are
poisoned with NaN so an element a kernel forgot to write fails the check.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference as ref_ops  # noqa: E402
from kernels import sort_by_expert  # noqa: E402
from kernels import triton_backend as tri  # noqa: E402
from kernels.autograd import (  # noqa: E402
    GroupedLinear,
    SwiGLU,
    SwiGLUExperts,
    SwiGLUExpertsCombined,
    WeightedCombine,
)
from kernels.triton import common  # noqa: E402
from tests.seeds import fresh_seed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (T, k, E, d_in, d_out, drop): sizes off the block multiples, empty experts, E to 256, k to 8
SHAPES = [
    (13, 2, 4, 40, 24, False),
    (9, 8, 16, 33, 17, False),
    (20, 1, 256, 16, 48, False),
    (11, 3, 8, 24, 40, True),
    (0, 2, 4, 16, 16, False),
]


@pytest.fixture(autouse=True)
def poison():
    common.POISON_OUTPUTS = True
    yield
    common.POISON_OUTPUTS = False


def make_dispatch(T, k, E, drop, g):
    scores = torch.rand(T, E, generator=g)
    scores[:, E // 2 :] *= 0.1  # skew: upper experts rarely chosen, some get no token
    ids = scores.topk(k, dim=-1).indices
    dropped = (torch.rand(T, k, generator=g) < 0.3) if drop else None
    return sort_by_expert(ids.to(DEVICE), E, None if dropped is None else dropped.to(DEVICE))


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    denom = ref.norm().item()
    return (out.double() - ref).norm().item() / (denom if denom > 0 else 1.0)


def randn(*shape, g, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def s2s_case(shape, x_grouped: bool, dtype):
    """A fresh seed and, from it, a dispatch, input rows, weights [E, N, K] and the fan-out of
    one scatter2scatter case."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k, E, K, N, drop = shape
    d = make_dispatch(T, k, E, drop, g)
    x = randn(T * k if x_grouped else T, K, g=g, dtype=dtype)
    w = randn(E, N, K, g=g, dtype=dtype)
    return seed, g, d, x, w, 1 if x_grouped else k


def kept_rows(d):
    return int(d.expert_offsets[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (True, True), (False, False),
                                                 (True, False)])
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter2scatter(shape, x_grouped, y_grouped, dtype):
    seed, g, d, x, w, fan = s2s_case(shape, x_grouped, dtype)
    out = tri.scatter2scatter(x, w, d, x_grouped, y_grouped, fan)
    ref = ref_ops.scatter2scatter(x.double(), w.double(), d, x_grouped, y_grouped, fan)
    n = kept_rows(d)
    if y_grouped:
        out, ref = out[:n], ref[:n]  # rows past the kept ones are unspecified when grouped
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"


# TMA: Hopper (sm_90) and newer; under the interpreter, any machine
needs_tma = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9,
    reason="TMA needs an sm_90+ GPU (this one is older)")
# TMA needs 16-byte aligned rows: bf16 sizes that are multiples of 8 (and not of the tile)
TMA_SHAPES = [(13, 2, 4, 40, 24, False), (9, 8, 16, 48, 72, False), (20, 1, 256, 16, 48, False),
              (11, 3, 8, 24, 40, True), (0, 2, 4, 16, 16, False)]


@needs_tma
@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (True, True), (False, False),
                                                 (True, False)])
@pytest.mark.parametrize("shape", TMA_SHAPES)
def test_scatter2scatter_with_tma_tiles(shape, x_grouped, y_grouped, w_transposed):
    """The TMA variant (grouped_tma) against float64, as the forward (w [E, N, K], K
    contiguous) and the input gradient (w^T, N contiguous) call it; rows of a block past its
    expert's end that TMA brings in (the next expert's, or dropped rows) are poisoned."""
    from kernels.triton import grouped_tma

    seed, g, d, x, w, fan = s2s_case(shape, x_grouped, torch.bfloat16)
    if w_transposed:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    n = kept_rows(d)
    if x_grouped:
        x[n:] = float("nan")  # dropped rows: never stored, whatever they hold
    assert grouped_tma.supports(x, w, x_grouped)
    out = grouped_tma.scatter2scatter(x, w, d, x_grouped, y_grouped, fan)
    ref = ref_ops.scatter2scatter(x.double(), w.double(), d, x_grouped, y_grouped, fan)
    if y_grouped:
        out, ref = out[:n], ref[:n]
    else:
        out, ref = out[d.sorted_pair_idx[:n]], ref[d.sorted_pair_idx[:n]]
    assert rel_err(out, ref) < TOL[torch.bfloat16], f"seed {seed}"


@needs_tma
@pytest.mark.parametrize("x_grouped,dy_grouped", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("shape", TMA_SHAPES + [(300, 2, 4, 32, 40, False)])
def test_group_weight_grad_with_tma_tiles(shape, x_grouped, dy_grouped):
    """The TMA weight gradient against float64, on rows put in expert order as the backend
    puts them: whole blocks of rows by TMA, the last partial block masked (several whole
    blocks an expert in the 300-token case). Rows past the kept ones are NaN: one that
    entered a sum (0 * NaN) would show."""
    from kernels.triton import grouped_tma

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k, E, K, N, drop = shape
    d = make_dispatch(T, k, E, drop, g)
    n = kept_rows(d)
    x = randn(T * k if x_grouped else T, K, g=g, dtype=torch.bfloat16)
    dy = randn(T * k, N, g=g, dtype=torch.bfloat16)
    if x_grouped:
        x[n:] = float("nan")
    dy[n:] = float("nan") if dy_grouped else 0.0
    if not dy_grouped:
        dy[d.sorted_pair_idx[n:]] = float("nan")
    fan = 1 if x_grouped else k
    xs = ref_ops.sorted_rows(x, d, x_grouped, fan, T * k)  # as grouped_mm.group_weight_grad
    dys = ref_ops.sorted_rows(dy, d, dy_grouped, 1, T * k)
    assert grouped_tma.supports_wgrad(xs, dys)
    out = grouped_tma.group_weight_grad(xs, dys, d)
    ref = ref_ops.group_weight_grad(x.double(), dy.double(), d, x_grouped, fan, dy_grouped)
    assert rel_err(out, ref) < TOL[torch.bfloat16], f"seed {seed}"


@needs_tma
def test_tma_variant_takes_only_what_tma_can_load():
    """16-bit floats with 16-byte aligned rows and a contiguous last dimension of w or w^T."""
    from kernels.triton import grouped_tma

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16, device=DEVICE)

    x, w = zeros(4, 16), zeros(2, 24, 16)
    assert grouped_tma.supports(x, w, True) and grouped_tma.supports(x, w.transpose(1, 2), True)
    assert not grouped_tma.supports(x.float(), w.float(), True)  # float32: the other kernels
    assert not grouped_tma.supports(zeros(4, 12), zeros(2, 24, 12), True)
    assert not grouped_tma.supports(x, w[:, ::2, ::2], True)  # no contiguous dimension
    assert not grouped_tma.supports(x[:, 1:9], w[:, :, :8], True)  # grouped rows misaligned
    assert grouped_tma.supports(x[:, 1:9], w[:, :, :8], False)  # gathered rows: by pointer
    with pytest.raises(ValueError, match="no contiguous"):
        grouped_tma.scatter2scatter(x, w[:, ::2, ::2], None, True, True, 1)
    dy = zeros(4, 24)
    assert grouped_tma.supports_wgrad(x, dy)
    assert not grouped_tma.supports_wgrad(x.float(), dy.float())
    assert not grouped_tma.supports_wgrad(x, dy[:, 1:9])  # misaligned rows
    assert grouped_tma.supports_wgrad(x, dy[:, 1:9].contiguous())  # gathered: a fresh copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grouped,dy_grouped", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("shape", SHAPES)
def test_group_weight_grad(shape, x_grouped, dy_grouped, dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k, E, K, N, drop = shape
    d = make_dispatch(T, k, E, drop, g)
    x = randn(T * k if x_grouped else T, K, g=g, dtype=dtype)
    dy = randn(T * k, N, g=g, dtype=dtype)
    fan = 1 if x_grouped else k
    out = tri.group_weight_grad(x, dy, d, x_grouped, fan, dy_grouped)
    ref = ref_ops.group_weight_grad(x.double(), dy.double(), d, x_grouped, fan, dy_grouped)
    assert out.shape == (E, N, K)
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"
    empty = (d.tokens_per_expert == 0).cpu()
    assert torch.all(out[empty.to(out.device)] == 0), "experts without rows need zero grads"


def quantized_stack(w: torch.Tensor, bits: int):
    """w [E, N, K] -> a QuantWeight stack of its experts, quantized one by one."""
    from kernels.quant import QuantWeight, quantize

    qs = [quantize(w[e].float().cpu(), bits) for e in range(w.shape[0])]
    return QuantWeight(torch.stack([q.data for q in qs]).to(DEVICE),
                       torch.stack([q.scale for q in qs]).to(DEVICE), bits, qs[0].group,
                       qs[0].cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (True, False)])
@pytest.mark.parametrize("shape", SHAPES + [(10, 2, 4, 128, 24, True)])
def test_scatter2scatter_quant_dequantizes_in_the_kernel(shape, x_grouped, y_grouped, bits,
                                                         dtype):
    """int8 / int4 weights against the float64 reference of the same quantized weights: K off
    the 64-column int4 group and odd (a scale per element), and K = 128, where every K-tile
    lies in one group (a scale per tile row)."""
    seed, g, d, x, w, fan = s2s_case(shape, x_grouped, dtype)
    wq = quantized_stack(w.float(), bits)
    out = tri.scatter2scatter_quant(x, wq, d, x_grouped, y_grouped, fan)
    ref = ref_ops.scatter2scatter_quant(x.double(), wq, d, x_grouped, y_grouped, fan)
    n = kept_rows(d)
    if y_grouped:
        out, ref = out[:n], ref[:n]
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (True, False)])
@pytest.mark.parametrize("shape", [(13, 2, 4, 64, 24, False), (9, 8, 16, 32, 17, False),
                                   (11, 3, 8, 96, 40, True), (0, 2, 4, 32, 16, False)])
def test_scatter2scatter_mxfp4_dequantizes_in_the_kernel(shape, x_grouped, y_grouped, dtype):
    """MXFP4 experts (GPT-OSS checkpoints), packed as read, against the float64 reference of
    their decoded values: every E2M1 code, and scales from 2^-20 to 2^4."""
    from kernels.mxfp4 import mxfp4_dequantize, mxfp4_weight

    seed, g, d, x, _, fan = s2s_case(shape, x_grouped, dtype)
    E, N, K = shape[2], shape[4], shape[3]
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(107, 132, (E, N, K // 32), generator=g, dtype=torch.uint8)
    wq = mxfp4_weight(blocks, scales)
    check_packed(x, wq.to(DEVICE), mxfp4_dequantize(blocks, scales).double(), d, x_grouped,
                 y_grouped, fan, dtype, seed, 1e-12)


def check_packed(x, wq, dense, d, x_grouped, y_grouped, fan, dtype, seed, torch_tol):
    """The Triton kernel on packed weights wq against the float64 reference on their decoded
    values dense [E, N, K] (dtype's tolerance), and the torch path against it (torch_tol)."""
    out = tri.scatter2scatter_quant(x, wq, d, x_grouped, y_grouped, fan)
    ref = ref_ops.scatter2scatter(x.double(), dense.to(DEVICE), d, x_grouped, y_grouped, fan)
    torch_path = ref_ops.scatter2scatter_quant(x.double(), wq, d, x_grouped, y_grouped, fan)
    n = kept_rows(d)
    if y_grouped:
        out, ref, torch_path = out[:n], ref[:n], torch_path[:n]
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"
    assert rel_err(torch_path, ref) < torch_tol, f"seed {seed}"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (True, False)])
@pytest.mark.parametrize("shape,block", [((13, 2, 4, 64, 24, False), (8, 32)),
                                         ((9, 8, 16, 32, 16, False), (16, 16)),
                                         ((11, 3, 8, 96, 40, True), (8, 32)),
                                         ((0, 2, 4, 32, 16, False), (16, 32))])
def test_scatter2scatter_fp8_dequantizes_in_the_kernel(shape, block, x_grouped, y_grouped,
                                                       dtype, fmt):
    """Block-scaled FP8 experts (DeepSeek-V3 / Qwen3-FP8 checkpoints), codes as read, against
    the float64 reference of torch's own float8 decoding: every finite code (subnormals
    included), a scale per (rows x cols) block from 2^-12 to 2^3, blocks narrower than a
    K-tile (a scale per element) and as wide (one per tile row)."""
    from kernels.quant import FP8_FORMATS, dequantize, fp8_weight

    seed, g, d, x, _, fan = s2s_case(shape, x_grouped, dtype)
    E, N, K = shape[2], shape[4], shape[3]
    f8 = FP8_FORMATS[fmt]
    codes = torch.randint(0, 256, (E, N, K), generator=g, dtype=torch.uint8)
    codes[codes.view(f8).float().isnan() | codes.view(f8).float().isinf()] = 0
    scale = torch.exp2(torch.randint(-12, 4, (E, N // block[0], K // block[1]), generator=g)
                       .float()) * (1 + torch.rand(E, N // block[0], K // block[1],
                                                   generator=g))
    wq = fp8_weight(codes.view(f8), scale, block).to(DEVICE)
    dense = (codes.view(f8).double() * scale.double().repeat_interleave(block[0], 1)
             .repeat_interleave(block[1], 2))
    torch.testing.assert_close(dequantize(wq, torch.float64).cpu(), dense, rtol=1e-7, atol=0)
    check_packed(x, wq, dense, d, x_grouped, y_grouped, fan, dtype, seed, 1e-6)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_codes_decode_in_the_kernel_as_torch_decodes_them(fmt):
    """Every finite code (subnormals, zeros of both signs), read back through the kernel by
    identity input rows, equals torch's float8 value exactly."""
    from kernels.quant import FP8_FORMATS, fp8_weight

    K, N = 32, 16
    codes = torch.arange(256, dtype=torch.int32).view(1, K, 8).transpose(1, 2)  # [1, 8, 32]
    codes = torch.cat([codes, codes.flip(-1)], 1).to(torch.uint8)
    codes[~codes.view(FP8_FORMATS[fmt]).float().isfinite()] = 0  # NaN / inf: no weight has one
    codes = codes.view(FP8_FORMATS[fmt])
    wq = fp8_weight(codes[0], torch.ones(1, 1), (N, K))
    wq = type(wq)(wq.data[None], wq.scale[None], 8, K, K, fp8=fmt, row_group=N).to(DEVICE)
    d = sort_by_expert(torch.zeros(K, 1, dtype=torch.long, device=DEVICE), 1)
    eye = torch.eye(K, dtype=torch.float32, device=DEVICE)
    out = tri.scatter2scatter_quant(eye, wq, d, False, False, 1)  # [K, N] = w^T
    torch.testing.assert_close(out.T.cpu(), codes[0].float(), rtol=0, atol=0)


def test_fp8_weight_refuses_what_it_cannot_hold():
    from kernels.quant import fp8_weight

    codes = torch.zeros(16, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiples of the block"):
        fp8_weight(codes, torch.ones(2, 1), (8, 24))
    with pytest.raises(ValueError, match="scale per block"):
        fp8_weight(codes, torch.ones(1, 1), (8, 32))
    with pytest.raises(ValueError, match="float8 codes"):
        fp8_weight(torch.zeros(16, 32), torch.ones(2, 1), (8, 32))


# (T, k, E, d_in, d_out, drop) with rows 16-byte aligned, as torch._grouped_mm needs
ALIGNED = [(13, 2, 4, 40, 24, False), (9, 8, 16, 32, 16, False), (20, 1, 64, 16, 48, False),
           (11, 3, 8, 24, 40, True), (0, 2, 4, 16, 16, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("shape", ALIGNED)
def test_torch_grouped_gemm_path_matches_reference(shape, x_grouped, y_grouped, dtype):
    """The PyTorch grouped-matmul implementation the Triton backend may pick, forward and
    weight gradient, against float64 (dropped pairs, empty experts, 0 tokens)."""
    from kernels import torch_grouped

    seed, g, d, x, w, fan = s2s_case(shape, x_grouped, dtype)
    T, k, E, K, N, drop = shape
    if not torch_grouped.supports(x, N, K):
        assert DEVICE == "cuda", "on the CPU torch._grouped_mm takes every float dtype"
        pytest.skip("torch._grouped_mm takes 16-bit floats on CUDA")
    out = torch_grouped.scatter2scatter(x, w, d, x_grouped, y_grouped, fan)
    ref = ref_ops.scatter2scatter(x.double(), w.double(), d, x_grouped, y_grouped, fan)
    n = kept_rows(d)
    if y_grouped:
        assert torch.all(out[n:] == 0), "dropped rows must be zero"
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"
    dy = randn(T * k, N, g=g, dtype=dtype)
    dw = torch_grouped.group_weight_grad(x, dy, d, x_grouped, fan, y_grouped)
    dw_ref = ref_ops.group_weight_grad(x.double(), dy.double(), d, x_grouped, fan, y_grouped)
    assert rel_err(dw, dw_ref) < TOL[dtype], f"seed {seed}"


def test_pick_times_each_implementation_once_per_shape_and_keeps_the_fastest():
    from kernels.triton import pick

    calls = []
    cands = {"triton": lambda: calls.append("triton") or "t",
             "torch": lambda: calls.append("torch") or "c"}
    times = {"triton": 2.0, "torch": 1.0}

    def timer(fn):
        fn()
        return times[calls[-1]]

    key = ("test", fresh_seed())
    assert pick.run(key, cands, torch.device("cpu"), timer) == "c"
    assert calls == ["triton", "torch", "torch"] and pick.choices()[key] == "torch"
    times["torch"] = 9.0  # chosen once per key: no second timing
    assert pick.run(key, cands, torch.device("cpu"), timer) == "c" and len(calls) == 4
    with pick.forced("triton"):
        assert pick.run(key, cands, torch.device("cpu"), timer) == "t"
    assert pick.run(("other", 1), {"triton": lambda: "t"}, torch.device("cpu")) == "t"
    with pytest.raises(ValueError, match="must be one of"), pick.forced("cutlass"):
        pass

    def broken():
        raise RuntimeError("layout not supported")

    with pytest.warns(RuntimeWarning, match="torch failed"):
        out = pick.run(("broken", fresh_seed()), {"triton": lambda: "t", "torch": broken},
                       torch.device("cpu"), lambda fn: fn() and 1.0)
    assert out == "t"


def test_pick_leaves_out_what_waits_for_the_host_within_without_host_waits():
    """kernels.without_host_waits (CUDA graph capture, serving): the per-expert loop, which
    reads the rows per expert back, is neither timed nor chosen, under a key of its own;
    outside, the earlier choice stands."""
    from kernels import without_host_waits
    from kernels.triton import pick

    timed = []
    cands = {"triton": lambda: "t", "loop": lambda: "l"}

    def timer(fn):
        timed.append(fn())
        return {"t": 2.0, "l": 1.0}[timed[-1]]

    key, cpu = ("waits", fresh_seed()), torch.device("cpu")
    assert pick.run(key, cands, cpu, timer) == "l" and timed == ["t", "l"]
    timed.clear()
    with without_host_waits():
        assert pick.run(key, cands, cpu, timer) == "t" and timed == ["t"]
        with pick.forced("loop"):  # a forced implementation is still used
            assert pick.run(key, cands, cpu, timer) == "l"
    assert pick.run(key, cands, cpu, timer) == "l" and timed == ["t"]
    assert pick.choices()[(*key, "no host waits")] == "triton" and pick.choices()[key] == "loop"


def test_bench_quantiles_are_those_do_bench_returns():
    """common.bench (the autotuners' and the picker's timer, which allocates no L2-flush
    buffer) reports the median, or the values at the quantiles the autotuner asks for."""
    from kernels.triton.common import pick_quantiles

    times = [float(t) for t in range(1, 12)]  # sorted
    assert pick_quantiles(times) == 6.0
    assert pick_quantiles(times, (0.5, 0.2, 0.8)) == [6.0, 3.0, 9.0]
    assert pick_quantiles([4.0], (0.5, 0.2, 0.8)) == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("group", [1, 3])
def test_grouped_launch_order_covers_every_tile(group, monkeypatch):
    """The L2-grouped tile order (grouped_mm.GROUP rows of tiles at a time) must visit every
    output tile once, also when GROUP does not divide the tile count: with 16x32 interpreter
    tiles, 3 into 5 row blocks (4 with rows, 1 past the end) and 4 N-tiles, and into 4 N-tiles
    by 3 K-tiles for the weight gradient."""
    from kernels.triton import grouped_mm

    monkeypatch.setattr(grouped_mm, "GROUP", group)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k, E, K, N = 20, 2, 2, 70, 100
    d = make_dispatch(T, k, E, False, g)
    x = randn(T, K, g=g, dtype=torch.float32)
    w = randn(E, N, K, g=g, dtype=torch.float32)
    out = tri.scatter2scatter(x, w, d, False, False, k)
    ref = ref_ops.scatter2scatter(x.double(), w.double(), d, False, False, k)
    assert rel_err(out, ref) < 1e-5, f"seed {seed}"
    dy = randn(T * k, N, g=g, dtype=torch.float32)
    dw = tri.group_weight_grad(x, dy, d, False, k, False)
    dw_ref = ref_ops.group_weight_grad(x.double(), dy.double(), d, False, k, False)
    assert rel_err(dw, dw_ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("y_grouped", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_combine_and_backward(shape, y_grouped, dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k, E, _, N, drop = shape
    d = make_dispatch(T, k, E, drop, g)
    y = randn(T * k, N, g=g, dtype=dtype)
    n = kept_rows(d)
    if y_grouped:
        y[n:] = float("nan")  # rows of dropped pairs must never be read
    else:
        y[d.sorted_pair_idx[n:]] = float("nan")
    wts = torch.rand(T, k, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    out = tri.weighted_combine(y, wts, d, y_grouped)
    ref = ref_ops.weighted_combine(y.double(), wts.double(), d, y_grouped)
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"

    dout = randn(T, N, g=g, dtype=dtype)
    dy, dw = tri.weighted_combine_backward(dout, y, wts, d, y_grouped)
    rdy, rdw = ref_ops.weighted_combine_backward(dout.double(), y.double(), wts.double(), d,
                                                 y_grouped)
    rows = slice(0, n) if y_grouped else slice(None)
    assert rel_err(dy[rows], rdy[rows]) < TOL[dtype], f"seed {seed}"
    assert rel_err(dw, rdw) < TOL[dtype], f"seed {seed}"


def glu_case(shape, dtype):
    """A fresh seed, a dispatch, token-order x [T, K] and up weights [E, 2F, K] (gate; up)
    at scale 0.3, so that the SwiGLU sees gates on both sides of zero but not huge ones."""
    seed, g, d, x, w, fan = s2s_case(shape[:4] + (2 * shape[4],) + shape[5:], False, dtype)
    return seed, g, d, x, w * 0.3, fan


def glu_impls(dtype, shape):
    """Our kernels with cp.async tiles, and with TMA tiles where they load these operands."""
    tma_ok = dtype == torch.bfloat16 and shape[3] % 8 == 0 and shape[4] % 8 == 0 and not (
        DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9)
    return ["triton"] + (["tma"] if tma_ok else [])


# E=256 (SHAPES[2]) is covered by test_scatter2scatter; the epilogues do not depend on E
# (10, 1, 4, ...): one slot a token, as EP's experts see their received rows
EPILOGUE_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], TMA_SHAPES[1],
                   (10, 1, 4, 24, 16, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
def test_scatter2scatter_swiglu_in_the_epilogue(shape, dtype):
    """The up projection with the SwiGLU in its epilogue -> (h, a), both grouped, and the
    down projection's input gradient with SwiGLU's backward in its epilogue -> dh (from dy
    grouped and in slot order), against float64, on each of our GEMM kernels."""
    from kernels.triton import pick

    seed, g, d, x, w, fan = glu_case(shape, dtype)
    T, k, E, K, F, drop = shape
    w_down_t = randn(E, K, F, g=g, dtype=dtype).transpose(1, 2)  # [E, F, K] as autograd has it
    rows = d.expert_offsets[-1:] if drop else None
    n = kept_rows(d)
    h_ref, a_ref = ref_ops.scatter2scatter_swiglu(x.double(), w.double(), d, False, fan)
    dy = {True: randn(T * k, K, g=g, dtype=dtype), False: randn(T * k, K, g=g, dtype=dtype)}
    for impl in glu_impls(dtype, shape):
        with pick.forced(impl):
            h, a = tri.scatter2scatter_swiglu(x, w, d, False, fan, rows)
            assert h.shape == (T * k, 2 * F) and a.shape == (T * k, F)
            assert rel_err(h[:n], h_ref[:n]) < TOL[dtype], f"{impl} h, seed {seed}"
            assert rel_err(a[:n], a_ref[:n]) < TOL[dtype], f"{impl} a, seed {seed}"
            for grouped, dyg in dy.items():
                dh = tri.scatter2scatter_swiglu_bwd(dyg, w_down_t, h, d, grouped, rows)
                want = ref_ops.scatter2scatter_swiglu_bwd(dyg.double(), w_down_t.double(),
                                                          h.double(), d, grouped)
                assert rel_err(dh[:n], want[:n]) < TOL[dtype], \
                    f"{impl} dh (dy grouped={grouped}), seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
def test_swiglu_backward_with_the_combine_weights_in_the_epilogue(shape, dtype):
    """dh and the combine weights' gradient from the output gradient in token order, h and
    the weights, without the expert outputs y: on each of our GEMM kernels against float64,
    and after a GEMM without an epilogue (loop: one per expert, then one pass of
    swiglu_bwd_combined's kernel), and the float64 identity itself against the combine's own
    backward (dout . y per pair)."""
    from kernels.triton import pick

    seed, g, d, x, w, fan = glu_case(shape, dtype)
    T, k, E, K, F, drop = shape
    w_out = randn(E, K, F, g=g, dtype=dtype) * 0.3
    rows = d.expert_offsets[-1:] if drop else None
    n = kept_rows(d)
    h64, _ = ref_ops.scatter2scatter_swiglu(x.double(), w.double(), d, False, fan)
    h = h64.to(dtype)  # what the forward would have saved
    dout = randn(T, K, g=g, dtype=dtype)
    wts = torch.rand(T, k, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    want_dh, want_dw = ref_ops.scatter2scatter_swiglu_bwd_combined(
        dout.double(), w_out.double().transpose(1, 2), h.double(), wts.double(), d)
    y = ref_ops.scatter2scatter(ref_ops.swiglu_fwd(h.double()), w_out.double(), d, True, True,
                                1)
    classic_dy, classic_dw = ref_ops.weighted_combine_backward(dout.double(), y, wts.double(),
                                                               d, True)
    assert rel_err(want_dw, classic_dw) < 1e-12, f"dout . y != (dout @ w) . a, seed {seed}"
    for impl in [*glu_impls(dtype, shape), "loop"]:
        with pick.forced(impl):
            dh, dw = tri.scatter2scatter_swiglu_bwd_combined(dout, w_out.transpose(1, 2), h,
                                                             wts, d, rows)
        assert dw.dtype == torch.float32 and dw.shape == (T, k)
        assert rel_err(dh[:n], want_dh[:n]) < TOL[dtype], f"{impl} dh, seed {seed}"
        assert rel_err(dw, want_dw) < TOL[dtype], f"{impl} dweights, seed {seed}"
    if drop:  # rows past the kept ones may hold anything after a GEMM: never read
        from kernels.triton.swiglu import swiglu_bwd_combined

        da_u = ref_ops.scatter2scatter(dout, w_out.transpose(1, 2), d, False, True, k)
        da_u[n:] = float("nan")
        dh, dw = swiglu_bwd_combined(da_u, h, wts, d)
        assert rel_err(dw, want_dw) < TOL[dtype] and rel_err(dh[:n], want_dh[:n]) < TOL[dtype]
    dy = tri.combine_grad_rows(dout, wts, d)
    assert rel_err(dy[:n], classic_dy[:n]) < TOL[dtype], f"combine_grad_rows, seed {seed}"
    assert rel_err(dy[:n], ref_ops.combine_grad_rows(dout.double(), wts.double(), d)[:n]) \
        < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    h = randn(37, 2 * 45, g=g, dtype=dtype)
    da = randn(37, 45, g=g, dtype=dtype)
    ref_a = ref_ops.swiglu_fwd(h.double())
    assert rel_err(tri.swiglu_fwd(h), ref_a) < TOL[dtype], seed
    ref_dh = ref_ops.swiglu_bwd(h.double(), da.double())
    assert rel_err(tri.swiglu_bwd(h, da), ref_dh) < TOL[dtype], seed
    # a row bound (the kept pairs of a dispatch with drops): the rows past it are skipped
    n = int(torch.randint(1, 37, (1,), generator=g))
    rows = torch.tensor([n], device=DEVICE)
    a, dh = tri.swiglu_fwd(h, rows), tri.swiglu_bwd(h, da, rows)
    assert rel_err(a[:n], ref_a[:n]) < TOL[dtype] and rel_err(dh[:n], ref_dh[:n]) < TOL[dtype]
    assert a[n:].isnan().all() and dh[n:].isnan().all(), "rows past the bound were written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# E=256 (SHAPES[2]) is covered kernel by kernel above; through autograd it costs ~40 s of
# interpreter time for nothing new
@pytest.mark.parametrize("mode", ["apart", "fused", "combined"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]])
def test_expert_mlp_autograd(shape, dtype, mode):
    """grouped_linear -> SwiGLU -> grouped_linear -> combine, all gradients, against the four
    functions apart in float64: on Triton, apart too, fused (SwiGLUExperts: the SwiGLU in
    the GEMMs' epilogues), and combined (SwiGLUExpertsCombined: no expert outputs kept)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k, E, D, F, drop = shape
    d = make_dispatch(T, k, E, drop, g)
    x = randn(T, D, g=g, dtype=dtype)
    w_in = randn(E, 2 * F, D, g=g, dtype=dtype) * 0.3
    w_out = randn(E, D, F, g=g, dtype=dtype) * 0.3
    wts = torch.rand(T, k, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    dout = randn(T, D, g=g, dtype=dtype)

    def run(backend, mode, *args):
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        xx, wi, wo, ww = leaves
        if mode == "combined":
            out = SwiGLUExpertsCombined.apply(xx, wi, wo, ww, d, backend)
        else:
            if mode == "fused":
                y = SwiGLUExperts.apply(xx, wi, wo, d, True, backend)
            else:
                h = GroupedLinear.apply(xx, wi, d, False, True, backend)
                a = SwiGLU.apply(h, backend, d.expert_offsets[-1:] if d.may_drop else None)
                y = GroupedLinear.apply(a, wo, d, True, True, backend)
            out = WeightedCombine.apply(y, ww, d, True, backend)
        out.backward(dout.to(out.dtype))
        return [out] + [leaf.grad for leaf in leaves]

    got = run(tri, mode, x, w_in, w_out, wts)
    want = run(ref_ops, "apart", x.double(), w_in.double(), w_out.double(), wts.double())
    for name, a, b in zip(["out", "dx", "dw_in", "dw_out", "dweights"], got, want, strict=False):
        assert rel_err(a, b) < TOL[dtype], f"{name}, seed {seed}"


@needs_tma
@pytest.mark.parametrize("cap", [None, 0.7])
def test_moe_layer_on_tma_gemms_matches_the_cp_async_kernels(cap, monkeypatch):
    """The bf16 MoE layer with every grouped GEMM run on the TMA variants
    (MOE_GROUPED_GEMM=tma): the forward, both input gradients (through w^T) and both weight
    gradients give what the cp.async kernels (tested against float64 above) give on the same
    routing."""
    from kernels.triton import grouped_tma, pick
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    calls = []
    run, wgrad = grouped_tma.scatter2scatter, grouped_tma.group_weight_grad
    monkeypatch.setattr(grouped_tma, "scatter2scatter",
                        lambda *a, **kw: calls.append((*a[3:5], kw.get("glu", 0)))
                        or run(*a, **kw))
    monkeypatch.setattr(grouped_tma, "group_weight_grad",
                        lambda *a: calls.append(("dw",)) or wgrad(*a))
    seed = fresh_seed()
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=6, expert_ffn=24, kernel_backend="triton",
                    router=RouterConfig(top_k=2, capacity_factor=cap))
    layer = MoELayer(32, cfg).to(DEVICE, torch.bfloat16)
    x0 = torch.randn(2, 9, 32, device=DEVICE, dtype=torch.bfloat16)
    got = {}
    for gemm in ("tma", "triton"):
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        with pick.forced(gemm):
            out, _ = layer(x)
            out.float().square().sum().backward()
        got[gemm] = [out, x.grad] + [p.grad for p in layer.parameters()]
        if gemm == "tma":  # up (tokens -> grouped) with the SwiGLU, down, the down's input
            # gradient from dout in token order with SwiGLU's and the combine weights'
            # backward, the up's input gradient, and both weight gradients
            want = [(False, True, 1), (True, True, 0), (False, True, 3), (True, False, 0),
                    ("dw",), ("dw",)]
            assert sorted(calls, key=str) == sorted(want, key=str), calls
    for a, b in zip(got["tma"], got["triton"], strict=True):
        assert rel_err(a, b.double()) < 1e-2, f"seed {seed}"


@pytest.mark.parametrize("gemm", ["triton", "torch", "loop"])
@pytest.mark.parametrize("cap", [None, 0.7])
def test_moe_layer_triton_backend_matches_reference(cap, gemm):
    """The whole MoE layer on the Triton backend (default on CUDA) vs the torch backend, with
    each grouped-GEMM implementation the backend picks between."""
    from kernels.triton import pick
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    seed = fresh_seed()
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=6, expert_ffn=20, kernel_backend="triton",
                    router=RouterConfig(top_k=2, capacity_factor=cap))
    layer = MoELayer(24, cfg).to(DEVICE)
    ref = MoELayer(24, MoEConfig(**{**cfg.__dict__, "kernel_backend": "torch"})).to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    ref = ref.double()
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    with pick.forced(gemm):
        out, _ = layer(x)
        out.square().sum().backward()
    xr = x.detach().double().requires_grad_(True)
    out_r, _ = ref(xr)
    out_r.square().sum().backward()
    assert rel_err(out, out_r) < 1e-5, f"seed {seed}"
    assert rel_err(x.grad, xr.grad) < 1e-5, f"seed {seed}"
    for (name, p), (_, pr) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        assert rel_err(p.grad, pr.grad) < 1e-5, f"{name}, seed {seed}"


@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("T,k,E", [(13, 2, 4), (300, 8, 128), (20, 1, 256), (0, 2, 4),
                                   (1000, 2, 8), (5, 1, 1)])
def test_block_schedule_kernel_matches_a_searchsorted(T, k, E, block_m):
    """The schedule kernel: each expert ceil(rows / BLOCK_M) blocks in expert order, each
    block's first row; entries past the last block get expert E (their rows unused)."""
    from kernels.triton.schedule import block_schedule

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    d = make_dispatch(T, k, E, False, g)
    expert, row, grid = block_schedule(d, block_m)
    counts = d.tokens_per_expert.cpu()
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    pid = torch.arange(T * k // block_m + (T * k % block_m > 0) + E)
    want_e = torch.searchsorted(block_end, pid, right=True)
    real = want_e < E
    e = want_e[real]
    want_row = d.expert_offsets.cpu()[e] + (pid[real] - (block_end[e] - blocks[e])) * block_m
    assert grid == len(pid) and torch.equal(expert.cpu(), want_e), f"seed {seed}"
    assert torch.equal(row.cpu()[real], want_row), f"seed {seed}"
