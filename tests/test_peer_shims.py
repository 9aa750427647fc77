"""bench/peer_shims.py: the torch stand-ins for the kernel-bench peers' CUDA extensions
(MegaBlocks' megablocks_ops; grouped_gemm, which MegaBlocks and megatron-core's GroupedMLP
call) against plain definitions of what those extensions compute. MegaBlocks' own code is not
in the repository (the benchmark brings it beside the project for a GPU run); megatron-core is
installed, so its GroupedMLP is run on the stand-in here too."""

import sys

import pytest
import torch

from bench import peer_shims as shims
from tests.dist_utils import run_ranks
from tests.seeds import fresh_seed


def _seed():
    return torch.Generator().manual_seed(fresh_seed())


def test_cumsums_match_their_definitions():
    x = torch.randint(0, 9, (3, 7), generator=_seed(), dtype=torch.int32)
    inc, exc = torch.full_like(x, -1), torch.full_like(x, -1)
    shims.inclusive_cumsum(x, 1, inc)
    shims.exclusive_cumsum(x, 1, exc)
    for b in range(3):
        for i in range(7):
            assert inc[b, i] == x[b, :i + 1].sum()
            assert exc[b, i] == x[b, :i].sum()


@pytest.mark.parametrize("batched", [False, True])
def test_histogram_counts_in_range_values_only(batched):
    x = torch.randint(-2, 8, (2, 50) if batched else (50,), generator=_seed())
    out = shims.histogram(x, 6)
    assert out.dtype == torch.int32
    rows = x.view(-1, 50)
    want = torch.stack([torch.tensor([(r == v).sum() for v in range(6)]) for r in rows])
    assert torch.equal(out, want if batched else want[0].to(torch.int32))


def test_sort_is_a_stable_key_sort_with_positions():
    x = torch.randint(0, 4, (40,), generator=_seed(), dtype=torch.int32)
    keys, pos = torch.empty_like(x), torch.empty_like(x)
    shims.sort(x, 2, keys, pos)
    assert pos.dtype == x.dtype
    assert torch.equal(keys, x[pos.long()])
    want = sorted(range(40), key=lambda i: (int(x[i]), i))  # ties keep their order
    assert pos.tolist() == want


def test_indices_give_each_row_block_its_experts_columns():
    block, cols = 4, 3
    rows_per_expert = [8, 0, 4, 12]  # padded to the block size; expert 1 has none
    padded_bins = torch.tensor(rows_per_expert, dtype=torch.int32).cumsum(0).to(torch.int32)
    nblocks = sum(rows_per_expert) // block
    out = torch.full((nblocks * cols,), -1, dtype=torch.int16)
    shims.indices(padded_bins, block, nblocks, cols, out)
    want = []
    for e, rows in enumerate(rows_per_expert):
        for _ in range(rows // block):
            want += [e * cols + c for c in range(cols)]
    assert out.tolist() == want


def test_replicate_and_its_backward_are_adjoint():
    bins = torch.tensor([2, 2, 5, 9], dtype=torch.int32)  # bin 1 is empty
    x = torch.randn(3, 4, generator=_seed())
    out = torch.empty(3, 9)
    shims.replicate_forward(x, bins, out)
    owner = [0, 0, 2, 2, 2, 3, 3, 3, 3]
    assert torch.equal(out, x[:, owner])
    g = torch.randn(3, 9, generator=_seed())
    back = torch.full((3, 4), float("nan"))
    shims.replicate_backward(g, bins, back)
    xr = x.clone().requires_grad_(True)
    (xr[:, owner] * g).sum().backward()
    torch.testing.assert_close(back, xr.grad)


def _groups(sizes):
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [slice(e - s, e) for s, e in zip(sizes, ends, strict=True)]


@pytest.mark.parametrize("trans_b", [False, True])
def test_gmm_and_its_gradients_match_a_loop_over_groups(trans_b):
    g = _seed()
    sizes = [5, 0, 7, 3]
    K, N = 8, 4  # torch._grouped_mm wants 16-byte rows
    a = torch.randn(sum(sizes), K, generator=g, requires_grad=True)
    b = torch.randn(4, N, K, generator=g) if trans_b else torch.randn(4, K, N, generator=g)
    b.requires_grad_(True)
    batch_sizes = torch.tensor(sizes)
    y = shims.gmm_op(a, b, batch_sizes, trans_b)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    want = torch.cat([a2[s] @ (b2[e].t() if trans_b else b2[e])
                      for e, s in enumerate(_groups(sizes))])
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (want * dy).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)  # the empty group's is zero
    assert torch.count_nonzero(b.grad[1]) == 0


def test_gmm_writes_into_c_when_given():
    a, b = torch.randn(6, 4), torch.randn(2, 4, 8)
    c = torch.full((6, 8), float("nan"))
    assert shims.gmm(a, b, torch.tensor([2, 4]), c=c) is c
    torch.testing.assert_close(c, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))


def test_install_registers_both_extensions(monkeypatch):
    for name in ("megablocks_ops", "grouped_gemm", "grouped_gemm.backend", "grouped_gemm.ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    shims.install()
    import grouped_gemm
    import megablocks_ops

    assert megablocks_ops.histogram is shims.histogram and megablocks_ops.indices is shims.indices
    assert grouped_gemm.backend.gmm is shims.gmm and grouped_gemm.ops.gmm is shims.gmm_op


def _megatron_grouped_mlp_matches_float64(rank, world_size, seed):
    """On one gloo rank: megatron-core's legacy GroupedMLP, built by bench.kernels'
    megatron_layer with grouped_gemm stood in for, against float64 per-expert math."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from bench.kernels import megatron_layer

    # megatron torch.compile's its activation: eager here spares a C++ build per fresh cache
    torch._dynamo.config.disable = True
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        E, d, f = 4, 32, 48
        # its all-to-all dispatcher makes a CUDA stream when built: the CPU takes all-gather
        layer = megatron_layer((d, f, E, 2, True, "mixtral"), torch.bfloat16, grouped=True,
                               dispatcher="allgather")
        experts = layer.experts
        assert type(experts).__name__ == "GroupedMLP"
        g = torch.Generator().manual_seed(seed)
        counts = torch.tensor([5, 0, 7, 3])  # rows per expert, in expert order; one empty
        T = int(counts.sum())
        x = torch.randn(T, d, generator=g).bfloat16().requires_grad_(True)
        probs = torch.rand(T, generator=g).bfloat16()
        dy = torch.randn(T, d, generator=g).bfloat16()
        out, _ = experts(x, counts, probs)
        out.backward(dy)

        w1 = experts.weight1.detach().double().view(E, d, 2 * f).requires_grad_(True)
        w2 = experts.weight2.detach().double().view(E, f, d).requires_grad_(True)
        xr = x.detach().double().requires_grad_(True)
        rows, start = [], 0
        for e, n in enumerate(counts.tolist()):
            h = xr[start:start + n] @ w1[e]
            a = F.silu(h[:, :f]) * h[:, f:] * probs[start:start + n, None].double()
            rows.append(a @ w2[e])
            start += n
        ref = torch.cat(rows)
        ref.backward(dy.double())

        def rel(a, b):
            return ((a.double() - b).norm() / b.norm()).item()

        assert rel(out, ref) < 1e-2
        assert rel(x.grad, xr.grad) < 1e-2
        assert rel(experts.weight1.grad.view(E, d, 2 * f), w1.grad) < 1e-2
        assert rel(experts.weight2.grad.view(E, f, d), w2.grad) < 1e-2
        assert torch.count_nonzero(experts.weight1.grad.view(E, d, 2 * f)[1]) == 0

        # its router's gate GEMM, which reads te_general_gemm (unbound without Transformer
        # Engine: NameError before megatron_layer's patch), in float32 from bf16
        from megatron.core.transformer.moe.moe_utils import router_gating_linear

        xg = torch.randn(T, d, generator=g).bfloat16().requires_grad_(True)
        wg = torch.randn(E, d, generator=g).bfloat16().requires_grad_(True)
        logits = router_gating_linear(xg, wg, None, torch.float32)
        assert logits.dtype == torch.float32
        dl = torch.randn(T, E, generator=g)
        logits.backward(dl)
        xr, wr = (t.detach().double().requires_grad_(True) for t in (xg, wg))
        ref = xr @ wr.T
        ref.backward(dl.double())
        assert rel(logits, ref) < 1e-5
        assert rel(xg.grad, xr.grad) < 1e-2 and rel(wg.grad, wr.grad) < 1e-2
    finally:
        dist.destroy_process_group()


def test_megatron_grouped_mlp_runs_on_the_grouped_gemm_stand_in():
    """What bench.kernels' `megatron-grouped` row times on the GPU, on the CPU in bf16:
    megatron-core's own GroupedMLP (layout, SwiGLU, probs) calling the stand-in gmm."""
    run_ranks(_megatron_grouped_mlp_matches_float64, 1, fresh_seed())
