"""The MoE layer against a token-by-token float64 loop: outputs, losses and every gradient."""

from __future__ import annotations

import pytest
import torch

from moe import MoEConfig, MoELayer
from routing import RouterConfig
from tests.naive import naive_moe

ROUTERS = {
    "softmax_renorm": dict(kind="topk", score="softmax", renormalize=True),
    "softmax_plain": dict(kind="topk", score="softmax", renormalize=False),
    "sigmoid_bias": dict(kind="topk", score="sigmoid", renormalize=True, expert_bias=True,
                         routed_scaling_factor=2.5),
    "sigmoid_plain": dict(kind="topk", score="sigmoid", renormalize=False),
    "softmax_bias": dict(kind="topk", score="softmax", renormalize=True, expert_bias=True),
    "threshold_renorm": dict(kind="threshold", threshold=0.5, renormalize=True,
                             entropy_loss_coef=0.1),
    "threshold_plain": dict(kind="threshold", threshold=0.3, renormalize=False,
                            routed_scaling_factor=1.5),
    "expert_choice": dict(kind="expert_choice"),
    "hash": dict(kind="hash"),
}
CAPACITY = {
    "dropfree": dict(capacity_factor=None),
    "cap_position": dict(capacity_factor=0.6, drop_policy="position"),
    "cap_probs": dict(capacity_factor=0.8, drop_policy="probs"),
}
VOCAB = 50


def build(router: str, k: int, E: int, cap: str, expert_type="swiglu", shared=0, gated=False,
          aux_type="micro_batch", seed=0):
    torch.manual_seed(seed)
    rc = RouterConfig(top_k=k, aux_loss_type=aux_type, **ROUTERS[router], **CAPACITY[cap])
    if router == "expert_choice" and cap != "dropfree":
        rc.capacity_factor = 0.5  # EC: average experts per token
    cfg = MoEConfig(num_experts=E, expert_ffn=6, expert_type=expert_type, router=rc,
                    num_shared_experts=shared, shared_expert_gate=gated, kernel_backend="torch")
    layer = MoELayer(8, cfg, vocab_size=VOCAB).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.7)
        if layer.router.__dict__.get("_buffers", {}).get("expert_bias") is not None:
            layer.router.expert_bias.normal_(0.0, 0.2)
    return layer


def check_against_naive(layer: MoELayer, B: int, S: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, layer.d_model, dtype=torch.float64, generator=g, requires_grad=True)
    token_ids = torch.randint(0, VOCAB, (B * S,), generator=g)
    upstream = torch.randn(B, S, layer.d_model, dtype=torch.float64, generator=g)
    out, routing = layer(x, token_ids)
    loss = (out * upstream).sum() + 0.3 * routing.aux_loss + 0.2 * routing.z_loss
    softmax = layer.cfg.router.score == "softmax" and layer.cfg.router.kind in ("topk",
                                                                                "threshold")
    assert (routing.entropy_loss is not None) == softmax
    if softmax:
        loss = loss + 0.1 * routing.entropy_loss
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)

    x_ref = x.detach().clone().requires_grad_(True)
    ref_out, ref_aux, ref_z, slots = naive_moe(layer, x_ref.view(-1, layer.d_model), token_ids, S)
    ref_loss = (ref_out.view(B, S, -1) * upstream).sum() + 0.3 * ref_aux + 0.2 * ref_z
    if softmax:  # entropy of each token's router softmax, averaged
        flat = x_ref.view(-1, layer.d_model)
        probs = [torch.softmax(layer.router.weight @ flat[t], 0) for t in range(B * S)]
        ref_ent = sum(-(p * p.log()).sum() for p in probs) / (B * S)
        torch.testing.assert_close(routing.entropy_loss, ref_ent, rtol=1e-10, atol=1e-10)
        ref_loss = ref_loss + 0.1 * ref_ent
    ref_grads = torch.autograd.grad(ref_loss, [x_ref, *params], allow_unused=True)

    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out.view(B, S, -1), **tol)
    torch.testing.assert_close(routing.aux_loss, torch.as_tensor(ref_aux, dtype=torch.float64),
                               **tol)
    torch.testing.assert_close(routing.z_loss, torch.as_tensor(ref_z, dtype=torch.float64), **tol)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads, strict=False):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")
    # Kept slots per expert agree with the loop.
    E = layer.cfg.num_experts
    counts = torch.zeros(E, dtype=torch.int64)
    for token_slots in slots:
        for e, _, kept in token_slots:
            counts[e] += int(kept)
    assert routing.tokens_per_expert.tolist() == counts.tolist()
    return routing


@pytest.mark.parametrize("cap", list(CAPACITY))
@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (4, 4), (8, 2), (8, 8), (16, 4), (64, 1),
                                 (64, 2), (64, 8)])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_layer_matches_naive_loop(router, E, k, cap):
    layer = build(router, k, E, cap, seed=E * 100 + k)
    routing = check_against_naive(layer, B=2, S=7, seed=E + k)
    if E == 64 and router != "expert_choice":
        # 14 tokens cannot reach 64 experts: some experts get no token.
        assert (routing.tokens_per_expert == 0).any()
    if cap != "dropfree" and router != "expert_choice" and E <= 8 and k < E:
        assert routing.dropped.any(), "capacity should drop slots at this factor"


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared,gated", [(1, False), (2, True)])
def test_shared_experts_and_gelu(expert_type, shared, gated):
    layer = build("softmax_plain", 2, 8, "dropfree", expert_type, shared, gated)
    check_against_naive(layer, B=2, S=5)


def test_sequence_aux_loss_matches_naive():
    layer = build("softmax_renorm", 2, 8, "dropfree", aux_type="sequence")
    check_against_naive(layer, B=3, S=6)


def test_expert_with_no_token_gets_zero_grad():
    layer = build("softmax_renorm", 1, 4, "dropfree")
    with torch.no_grad():
        layer.router.weight[3] = -50.0 * layer.router.weight[:3].abs().sum(0)  # never chosen
    x = torch.randn(1, 9, 8, dtype=torch.float64).abs()
    out, routing = layer(x)
    assert routing.tokens_per_expert[3] == 0
    out.sum().backward()
    assert torch.all(layer.experts.w_in.grad[3] == 0)
    assert torch.all(layer.experts.w_out.grad[3] == 0)
    check_against_naive(layer, B=1, S=9)


@pytest.mark.parametrize("cap", ["dropfree", "cap_probs"])
def test_layer_keeps_no_expert_outputs_for_its_backward(cap):
    """The layer combines inside its experts' autograd function (SwiGLUExpertsCombined): it
    keeps x, h, a and the weights, not the expert outputs y [T * k, d] that a separate
    combine keeps, and computes the same output and gradients."""
    from bench.train_memory import kept_bytes
    from kernels import sort_by_expert, weighted_combine

    layer = build("softmax_renorm", 2, 4, cap)
    flat = torch.randn(11, layer.d_model, dtype=torch.float64, requires_grad=True)

    def apart():
        r = layer.router(flat)
        d = sort_by_expert(r.expert_ids, r.num_experts, r.dropped if layer.router.may_drop
                           else None, "torch")
        return weighted_combine(layer.experts(flat, d), r.combine_weights, d)

    kept_apart, out_apart = kept_bytes(apart)
    kept_fused, (out_fused, _) = kept_bytes(lambda: layer(flat))
    T, d_model, k = flat.shape[0], flat.shape[1], 2
    assert kept_apart - kept_fused == T * k * d_model * flat.element_size()
    grads = []
    for out in (out_apart, out_fused):
        layer.zero_grad()
        flat.grad = None
        out.square().sum().backward()
        grads.append([flat.grad.clone()] + [p.grad.clone() for p in layer.parameters()
                                            if p.grad is not None])
    torch.testing.assert_close(out_fused, out_apart)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_zero_tokens():
    layer = build("softmax_renorm", 2, 4, "cap_position")
    x = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    out, routing = layer(x)
    assert out.shape == (0, 8) and routing.tokens_per_expert.sum() == 0
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    layer = build("softmax_renorm", 2, 8, "dropfree")
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    ref, r_ref = layer(x)
    low = layer.to(dtype)
    out, r = low(x.to(dtype))
    assert torch.equal(r.expert_ids, r_ref.expert_ids) or dtype == torch.bfloat16
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < (1e-6 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize("router,cap", [
    ("softmax_renorm", "dropfree"), ("softmax_plain", "cap_position"),
    ("softmax_bias", "cap_probs"), ("sigmoid_bias", "dropfree"),
    ("threshold_renorm", "dropfree")])
def test_token_choice_layer_step_never_waits_for_the_device(router, cap):
    """Forward and backward of a token-choice layer on the Triton backend (the GPU default)
    read nothing back to the host (no bincount, boolean indexing or item), so the host keeps
    queueing kernels ahead of the GPU. validate=False: the NaN check on the logits is the one
    read the router makes by default, and it is caught as one."""
    from tests.host_sync import HostSync, no_host_sync

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
    group = dict(n_group=2, topk_group=1, group_score="top2") if "sigmoid" in router else {}
    rc = RouterConfig(top_k=2, validate=False, **ROUTERS[router], **CAPACITY[cap], **group)
    layer = MoELayer(16, MoEConfig(num_experts=4, expert_ffn=8, router=rc,
                                   kernel_backend="triton")).to(device)
    x = torch.randn(12, 16, device=device, requires_grad=True)
    out, _ = layer(x)  # warm-up: on a GPU the backend times its GEMM candidates once
    out.square().sum().backward()
    with no_host_sync():
        out, routing = layer(x)
        (out.square().sum() + routing.aux_loss).backward()
    rc.validate = True
    with pytest.raises(HostSync, match="_local_scalar_dense .*routers.py"), no_host_sync():
        layer(x)
