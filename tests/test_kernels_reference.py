"""The reference scatter/gather ops against loops, and their autograd by gradcheck."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import grouped_linear, sort_by_expert, weighted_combine


def random_routing(T, k, E, drop_p, g):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.int64)
    dropped = torch.rand(T, k, generator=g) < drop_p
    return ids, dropped


@pytest.mark.parametrize("T,k,E,drop_p", [(9, 2, 5, 0.0), (13, 3, 8, 0.3), (6, 1, 16, 0.5),
                                          (0, 2, 4, 0.0), (4, 4, 4, 1.0)])
def test_sort_by_expert(T, k, E, drop_p):
    g = torch.Generator().manual_seed(T * 7 + k)
    ids, dropped = random_routing(T, k, E, drop_p, g)
    d = sort_by_expert(ids, E, dropped)
    kept = [(e, t * k + j) for t in range(T) for j in range(k)
            for e in [int(ids[t, j])] if not dropped[t, j]]
    kept.sort()  # expert, then slot order: what a stable sort gives
    n = int(d.expert_offsets[-1])
    assert n == len(kept)
    assert d.sorted_pair_idx[:n].tolist() == [p for _, p in kept]
    assert d.sorted_expert_idx[:n].tolist() == [e for e, _ in kept]
    assert torch.all(d.sorted_expert_idx[n:] == E)
    assert d.sorted_token_idx.tolist() == (d.sorted_pair_idx // k).tolist()
    counts = [sum(1 for e, _ in kept if e == x) for x in range(E)]
    assert d.tokens_per_expert.tolist() == counts


def loop_grouped_linear(x, w, ids, dropped, x_grouped, y_grouped, d):
    """Per (token, slot) loop; grouped inputs/outputs are mapped through d by position."""
    T, k = ids.shape
    y = torch.zeros(T * k, w.shape[1], dtype=x.dtype)
    row_of_pair = {int(p): r for r, p in enumerate(d.sorted_pair_idx.tolist())}
    for t, j in itertools.product(range(T), range(k)):
        if dropped[t, j]:
            continue
        p = t * k + j
        xin = x[row_of_pair[p]] if x_grouped else x[t]
        y[row_of_pair[p] if y_grouped else p] = w[int(ids[t, j])] @ xin
    return y


@pytest.mark.parametrize("x_grouped,y_grouped", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("T,k,E,drop_p", [(7, 2, 4, 0.0), (11, 3, 6, 0.4), (5, 1, 9, 0.0)])
def test_grouped_linear_matches_loop_and_gradcheck(x_grouped, y_grouped, T, k, E, drop_p):
    g = torch.Generator().manual_seed(T + 10 * k + E)
    ids, dropped = random_routing(T, k, E, drop_p, g)
    d = sort_by_expert(ids, E, dropped)
    rows = T * k if x_grouped else T
    x = torch.randn(rows, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(E, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = grouped_linear(x, w, d, x_grouped, y_grouped, backend="torch")
    ref = loop_grouped_linear(x.detach(), w.detach(), ids, dropped, x_grouped, y_grouped, d)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: grouped_linear(a, b, d, x_grouped, y_grouped, backend="torch"), (x, w)
    )


@pytest.mark.parametrize("y_grouped", [False, True])
def test_weighted_combine_matches_loop_and_gradcheck(y_grouped):
    g = torch.Generator().manual_seed(3)
    T, k, E = 8, 3, 5
    ids, dropped = random_routing(T, k, E, 0.3, g)
    d = sort_by_expert(ids, E, dropped)
    y = torch.randn(T * k, 4, dtype=torch.float64, generator=g, requires_grad=True)
    wts = torch.rand(T, k, dtype=torch.float64, generator=g, requires_grad=True)
    out = weighted_combine(y, wts, d, y_grouped, backend="torch")
    row_of_pair = {int(p): r for r, p in enumerate(d.sorted_pair_idx.tolist())}
    ref = torch.zeros(T, 4, dtype=torch.float64)
    for t, j in itertools.product(range(T), range(k)):
        if not dropped[t, j]:
            row = row_of_pair[t * k + j] if y_grouped else t * k + j
            ref[t] += wts[t, j].detach() * y.detach()[row]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: weighted_combine(a, b, d, y_grouped, backend="torch"), (y, wts)
    )


@pytest.mark.parametrize("y_grouped", [False, True])
def test_weighted_combine_keeps_y_only_for_the_weights_gradient(y_grouped):
    """With weights that need no gradient (EP's sum of rows the experts weighed), the
    combine keeps only the weights when y is expert-grouped, and y's gradient is the same."""
    from bench.train_memory import kept_bytes

    g = torch.Generator().manual_seed(4)
    T, k, E = 7, 2, 3
    ids, dropped = random_routing(T, k, E, 0.3, g)
    d = sort_by_expert(ids, E, dropped)
    y = torch.randn(T * k, 4, dtype=torch.float64, generator=g, requires_grad=True)
    wts = torch.rand(T, k, dtype=torch.float64, generator=g)
    dout = torch.randn(T, 4, dtype=torch.float64, generator=g)
    grads = []
    for need in (True, False):
        w = wts.clone().requires_grad_(need)
        kept, out = kept_bytes(lambda w=w: weighted_combine(y, w, d, y_grouped, "torch"))
        assert kept == w.nbytes + (y.nbytes if need or not y_grouped else 0)
        grads.append(torch.autograd.grad(out, y, dout)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_dropped_rows_are_never_read():
    g = torch.Generator().manual_seed(0)
    ids, dropped = random_routing(6, 2, 3, 0.5, g)
    d = sort_by_expert(ids, 3, dropped)
    n = int(d.expert_offsets[-1])
    y = torch.randn(12, 4, dtype=torch.float64, generator=g)
    y[n:] = float("nan")  # poison: rows of dropped pairs
    out = weighted_combine(y, torch.rand(6, 2, dtype=torch.float64), d, True, backend="torch")
    assert torch.isfinite(out).all()
    h = grouped_linear(y, torch.randn(3, 2, 4, dtype=torch.float64), d, True, True, "torch")
    assert torch.isfinite(h).all() and torch.all(h[n:] == 0)


def test_bad_shapes_and_backend():
    d = sort_by_expert(torch.tensor([[0, 1]]), 2)
    with pytest.raises(ValueError, match="does not match"):
        grouped_linear(torch.randn(1, 4), torch.randn(2, 3, 5), d)
    with pytest.raises(ValueError, match="experts"):
        grouped_linear(torch.randn(1, 4), torch.randn(3, 3, 4), d)
    with pytest.raises(ValueError, match="backend"):
        grouped_linear(torch.randn(1, 4), torch.randn(2, 3, 4), d, backend="cuda-magic")


def test_swiglu_experts_names_bad_shapes():
    """swiglu_experts refuses weights, inputs or combine weights that do not fit, by name."""
    from kernels import swiglu_experts

    d = sort_by_expert(torch.randint(0, 4, (5, 2)), 4)
    x, w_in, w_out = torch.randn(5, 6), torch.randn(4, 8, 6), torch.randn(4, 6, 4)
    assert swiglu_experts(x, w_in, w_out, d).shape == (10, 6)
    assert swiglu_experts(x, w_in, w_out, d, weights=torch.rand(5, 2)).shape == (5, 6)
    for args, match in [((x, w_in[0], w_out), "need w_in"), ((x, w_in[:, :7], w_out), "need w_in"),
                        ((x[:, :5], w_in, w_out), "input size 5"),
                        ((x, w_in[:3], w_out[:3]), "3 experts")]:
        with pytest.raises(ValueError, match=match):
            swiglu_experts(*args, d)
    with pytest.raises(ValueError, match="combine weights"):
        swiglu_experts(x, w_in, w_out, d, weights=torch.rand(5, 3))
