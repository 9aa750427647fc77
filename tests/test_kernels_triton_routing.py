"""The fused routing kernels (top-k router fwd/bwd, counting sort by expert) against float64
formulas and torch's stable sort: interpreter on the CPU, compiled on CUDA; fresh inputs each
run, poisoned outputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference as ref_ops  # noqa: E402
from kernels import router_losses, sort_by_expert, topk_route  # noqa: E402
from kernels import triton_backend as tri  # noqa: E402
from kernels.triton import common  # noqa: E402
from tests.seeds import fresh_seed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison():
    common.POISON_OUTPUTS = True
    yield
    common.POISON_OUTPUTS = False


def seeded():
    seed = fresh_seed()
    return seed, torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("T,k,E,drop", [(13, 2, 4, False), (9, 8, 16, False),
                                        (20, 1, 256, False), (37, 3, 8, True),
                                        (0, 2, 4, False), (300, 8, 128, True),
                                        (70, 2, 64, False)])
def test_counting_sort_equals_torch_stable_sort(T, k, E, drop):
    seed, g = seeded()
    scores = torch.rand(T, E, generator=g)
    scores[:, E // 2:] *= 0.1  # skewed: some experts get no pair
    ids = scores.topk(k, dim=-1).indices
    flat = ids.reshape(-1)
    if drop:
        flat = torch.where(torch.rand(T * k, generator=g) < 0.3, E, flat)
    got = tri.sort_pairs(flat.to(DEVICE), E, k)
    want = ref_ops.sort_pairs(flat, E, k)
    for name, a, b in zip(("pair", "token", "expert", "offsets", "slot rows"), got, want,
                          strict=True):
        assert torch.equal(a.cpu(), b), f"seed {seed}: {name} differs"
    d = sort_by_expert(ids.to(DEVICE), E, backend="triton")
    assert torch.equal(d.expert_offsets.cpu(), ref_ops.sort_pairs(ids.reshape(-1), E, k)[3])


def route64(logits, k, sigmoid, renorm, scale, bias):
    """float64 top-k routing written out plainly: (ids, weights)."""
    x = logits.double()
    s = torch.sigmoid(x) if sigmoid else torch.softmax(x, -1)
    sel = s + (bias.double() if bias is not None else 0)
    ids = sel.topk(k, -1).indices
    w = s.gather(1, ids)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return ids, w * scale


CASES = [  # (T, E, k, sigmoid, renormalize, scale, bias)
    (13, 4, 2, False, True, 1.0, False),
    (9, 16, 8, False, False, 1.0, False),
    (20, 256, 1, False, True, 1.0, False),
    (17, 64, 8, True, True, 2.5, True),
    (11, 8, 3, True, False, 1.0, False),
    (33, 128, 8, False, False, 1.0, False),
    (0, 8, 2, False, True, 1.0, False),
    (5, 1, 1, True, False, 1.0, False),
    (7, 16, 16, False, True, 1.0, False),  # k = E: a dense-to-sparse schedule's first steps
    (15, 64, 6, False, True, 1.0, True),  # softmax with a selection bias (ERNIE-4.5's)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k,sigmoid,renorm,scale,use_bias", CASES)
def test_fused_topk_router_forward_and_backward(T, E, k, sigmoid, renorm, scale, use_bias,
                                                dtype):
    seed, g = seeded()
    # distinct multiples of 1/32 in each row: exact in bf16, so no ties in the selection
    perms = [torch.randperm(E, generator=g) for _ in range(T)]
    logits = (torch.stack(perms).float() / 32 - E / 64 if T else torch.zeros(0, E)).to(dtype)
    bias = torch.randn(E, generator=g) * 0.1 if use_bias else None
    ids_ref, w_ref = route64(logits, k, sigmoid, renorm, scale, bias)
    x = logits.to(DEVICE).clone().requires_grad_(True)
    ids, w = topk_route(x, k, "sigmoid" if sigmoid else "softmax", renorm, scale,
                        None if bias is None else bias.to(DEVICE), backend="triton")
    assert torch.equal(ids.cpu(), ids_ref), f"seed {seed}: selection differs"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = (w.double().cpu() - w_ref).norm() / max(w_ref.norm(), 1e-12)
    assert torch.isfinite(w).all() and err < tol, f"seed {seed}: weights rel. error {err:.2e}"
    dw = torch.randn(T, k, generator=g)
    (w * dw.to(DEVICE)).sum().backward()
    x64 = logits.detach().double().requires_grad_(True)
    s = torch.sigmoid(x64) if sigmoid else torch.softmax(x64, -1)
    w64 = s.gather(1, ids_ref)
    if renorm:
        w64 = w64 / w64.sum(-1, keepdim=True)
    (w64 * scale * dw.double()).sum().backward()
    ref = x64.grad
    got = x.grad.double().cpu()
    assert torch.isfinite(got).all(), f"seed {seed}: unwritten logit gradients"
    err = (got - ref).norm() / max(ref.norm(), 1e-6)  # k=1 renormalised: ref is 0
    assert err < tol, f"seed {seed}: logit grad rel. error {err:.2e}"


GROUP_CASES = [  # (T, E, k, n_group, topk_group, top2, sigmoid, bias)
    (13, 8, 2, 2, 1, True, True, True),  # DeepSeek-V3's rule, small
    (21, 64, 6, 8, 3, True, True, True),  # V3-like: 8 groups, top-2 group scores, bias
    (17, 64, 6, 8, 3, False, False, False),  # V2-like: softmax, best-expert group scores
    (9, 48, 4, 3, 2, False, True, False),  # 3 groups: not a power of 2
    (0, 16, 2, 4, 2, True, True, True),
]


def route64_groups(logits, k, n_group, topk_group, top2, sigmoid, bias):
    """Group-limited top-k written out token by token in float64: expert ids [T, k] (sorted)
    and unnormalised weights."""
    x = logits.double()
    s = torch.sigmoid(x) if sigmoid else torch.softmax(x, -1)
    sel = s + (bias.double() if bias is not None else 0)
    T, E = sel.shape
    per = E // n_group
    ids = torch.zeros(T, k, dtype=torch.int64)
    for t in range(T):
        scores = []
        for g in range(n_group):
            best = sorted(sel[t, g * per:(g + 1) * per].tolist(), reverse=True)
            scores.append(best[0] + best[1] if top2 else best[0])
        groups = sorted(range(n_group), key=lambda g: -scores[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        ids[t] = torch.tensor(sorted(sorted(allowed, key=lambda e: -sel[t, e].item())[:k]))
    return ids, s


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("T,E,k,n_group,topk_group,top2,sigmoid,use_bias", GROUP_CASES)
def test_group_limited_topk_router(T, E, k, n_group, topk_group, top2, sigmoid, use_bias,
                                   backend):
    """The fused kernel (and the torch ops) choose each token's k experts within its
    topk_group best groups, as a token-by-token float64 loop does; weights and logit
    gradients are those of the chosen experts' scores (the selection held fixed)."""
    seed, g = seeded()
    logits = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1 if use_bias else None
    want, s = route64_groups(logits, k, n_group, topk_group, top2, sigmoid, bias)
    x = logits.to(DEVICE).clone().requires_grad_(True)
    ids, w = topk_route(x, k, "sigmoid" if sigmoid else "softmax", True, 2.5,
                        None if bias is None else bias.to(DEVICE), backend=backend,
                        groups=(n_group, topk_group, top2))
    assert torch.equal(ids.cpu().sort(-1).values, want), f"seed {seed}: selection differs"
    w_ref = s.gather(1, ids.cpu())
    w_ref = 2.5 * w_ref / w_ref.sum(-1, keepdim=True)
    assert torch.allclose(w.double().cpu(), w_ref, rtol=1e-5, atol=1e-7), f"seed {seed}"
    dw = torch.randn(T, k, generator=g)
    (w * dw.to(DEVICE)).sum().backward()
    x64 = logits.double().requires_grad_(True)
    s64 = torch.sigmoid(x64) if sigmoid else torch.softmax(x64, -1)
    w64 = s64.gather(1, ids.cpu())
    (2.5 * w64 / w64.sum(-1, keepdim=True) * dw.double()).sum().backward()
    assert torch.allclose(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-6), f"seed {seed}"


def test_group_limited_routing_refuses_groups_that_do_not_fit():
    x = torch.zeros(2, 8)
    for groups in [(3, 1, False), (2, 3, False), (4, 1, False), (8, 2, True)]:
        with pytest.raises(ValueError, match="do not fit"):
            topk_route(x, 4 if groups == (4, 1, False) else 2, groups=groups, backend="torch")


def test_reference_and_triton_routers_agree_inside_the_layer():
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    seed, g = seeded()
    torch.manual_seed(seed)
    x = torch.randn(2, 9, 32, generator=g).to(DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        layer = MoELayer(32, MoEConfig(num_experts=8, expert_ffn=16, kernel_backend=backend,
                                       router=RouterConfig(top_k=2, score="sigmoid",
                                                           expert_bias=True))).to(DEVICE)
        xi = x.clone().requires_grad_(True)
        out, r = layer(xi)
        (out.square().sum() + r.aux_loss).backward()
        outs.append((out.detach(), xi.grad, layer.router.weight.grad, r.expert_ids))
    assert torch.equal(outs[0][3], outs[1][3]), f"seed {seed}: different expert choices"
    for name, a, b in zip(("out", "dx", "d router"), outs[0][:3], outs[1][:3], strict=False):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < 1e-5, f"seed {seed}: {name} rel. error {err:.2e}"


LOSS_CASES = [  # (T, E, k, sigmoid, logit scale, sequence length or None: the batch)
    (13, 4, 2, False, 1.0, None),
    (37, 8, 2, False, 3.0, None),
    (300, 256, 8, False, 1.0, None),  # 19 blocks of rows: the finishing program loops twice
    (70, 128, 8, True, 2.0, None),
    (21, 64, 6, True, 1.0, None),
    (9, 16, 4, False, 100.0, None),  # probabilities that underflow to 0: entropy's clamp
    (5, 1, 1, True, 1.0, None),
    (0, 8, 2, False, 1.0, None),
    (40, 8, 2, False, 1.0, 8),  # sequence-wise aux loss: 5 sequences of 8
    (300, 256, 8, False, 1.0, 100),  # 7 blocks a sequence, the last one partial
    (70, 128, 8, True, 2.0, 35),
    (12, 4, 2, False, 1.0, 12),  # one sequence: the batch
    (0, 8, 2, True, 1.0, 4),
]


def losses64(logits, ids, sigmoid, seq=None):
    """Switch aux (over the batch, or per sequence of seq tokens and averaged), z and softmax
    entropy, written out in float64."""
    T, E = logits.shape
    k = ids.shape[1]
    p = torch.softmax(logits, -1)
    q = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True) if sigmoid else p
    seq = seq or T
    aux = 0.0
    for a in range(0, T, seq):
        f = torch.stack([(ids[a:a + seq] == e).sum() for e in range(E)]).double() / (seq * k)
        aux = aux + E * (f * q[a:a + seq].mean(0)).sum() / (T // seq)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    ent = -(p * p.clamp(min=1e-20).log()).sum(-1).mean()
    return aux, z, ent


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("T,E,k,sigmoid,scale,seq", LOSS_CASES)
def test_fused_router_losses_forward_and_backward(T, E, k, sigmoid, scale, seq, backend):
    """kernels.router_losses: the aux (batch- or sequence-wise), z and entropy losses and
    their logit gradient (the selection held fixed) against float64 formulas; also equal to
    routing.losses."""
    from routing.losses import router_entropy, router_z_loss, switch_aux_loss

    seed, g = seeded()
    logits = (torch.randn(T, E, generator=g) * scale).double()  # exact in float32
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.int64)
    x = logits.float().to(DEVICE).requires_grad_(True)
    *got, counts = router_losses(x, ids.to(DEVICE), "sigmoid" if sigmoid else "softmax", True,
                                 backend=backend, seq_len=seq)
    assert torch.equal(counts.cpu(), torch.bincount(ids.reshape(-1), minlength=E))
    dl = torch.randn(3, generator=g, dtype=torch.float64)
    (sum(v * c for v, c in zip(got, dl.float().to(DEVICE), strict=True))).backward()
    if T == 0:
        assert [v.item() for v in got] == [0.0, 0.0, 0.0] and x.grad.shape == (0, E)
        return
    x64 = logits.clone().requires_grad_(True)
    want = losses64(x64, ids, sigmoid, seq)
    (sum(v * c for v, c in zip(want, dl, strict=True))).backward()
    for name, a, b in zip(("aux", "z", "entropy"), got, want, strict=True):
        # relative, or absolute below 0.01: a near one-hot softmax's entropy (scale 100)
        # is a sum of float32 rounding-sized terms
        err = abs(a.item() - b.item()) / max(abs(b.item()), 1e-2)
        assert err < 1e-5, f"seed {seed}: {name} {a.item()} vs {b.item()} ({err:.1e})"
    grad = x.grad.double().cpu()
    assert torch.isfinite(grad).all(), f"seed {seed}: unwritten logit gradients"
    err = ((grad - x64.grad).norm() / x64.grad.norm()).item()
    assert err < 1e-5, f"seed {seed}: logit grad rel. error {err:.2e}"
    s = torch.sigmoid(logits) if sigmoid else None
    probs = s / s.sum(-1, keepdim=True) if sigmoid else torch.softmax(logits, -1)
    oracle = (switch_aux_loss(probs, ids, E, seq), router_z_loss(logits),
              router_entropy(torch.softmax(logits, -1)))
    for a, b in zip(want, oracle, strict=True):
        assert abs(a.item() - b.item()) <= 1e-12 * max(1.0, abs(b.item()))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("used", [(0,), (1,), (2,), (0, 1), (1, 2)])
def test_router_losses_left_out_of_the_objective(used, backend):
    """A loss left out of the objective gets no gradient (autograd passes None, not zeros):
    the logit gradient is the other losses' alone."""
    seed, g = seeded()
    T, E, k = 19, 16, 4
    logits = torch.randn(T, E, generator=g).double()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    x = logits.float().to(DEVICE).requires_grad_(True)
    got = router_losses(x, ids.to(DEVICE), "softmax", True, backend=backend)
    sum(got[i] for i in used).backward()
    x64 = logits.clone().requires_grad_(True)
    want = losses64(x64, ids, False)
    sum(want[i] for i in used).backward()
    err = ((x.grad.double().cpu() - x64.grad).norm() / x64.grad.norm()).item()
    assert err < 1e-5, f"seed {seed}: losses {used}: logit grad rel. error {err:.2e}"


def test_router_losses_refuse_bad_shapes():
    with pytest.raises(ValueError, match="score"):
        router_losses(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64), "tanh")
    with pytest.raises(ValueError, match=r"expert_ids \[T, k\]"):
        router_losses(torch.zeros(2, 4), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="sequences of length 4"):
        router_losses(torch.zeros(6, 4), torch.zeros(6, 1, dtype=torch.int64), seq_len=4)
