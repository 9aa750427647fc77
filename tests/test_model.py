"""The MoE transformer LM: shapes, attention against a loop, causality, losses, training."""

from __future__ import annotations

import math

import pytest
import torch

from bench.train_memory import kept_bytes
from moe import ModelConfig, MoEConfig, MoETransformer
from moe.attention import Attention, rope_cos_sin
from moe.config import MLAConfig
from routing import RouterConfig


def tiny_config(**kw) -> ModelConfig:
    moe = kw.pop("moe", MoEConfig(num_experts=4, expert_ffn=32, kernel_backend="torch",
                                  router=RouterConfig(top_k=2)))
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
                dense_ffn=48, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def test_attention_matches_loop():
    torch.manual_seed(0)
    attn = Attention(16, n_heads=4, n_kv_heads=2, head_dim=4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), 4, 10000.0, torch.float64)
    out = attn(x, cos, sin)

    def rope(v, s):  # v [hd] at position s, rotate pairs (i, i + hd/2)
        half = v.shape[0] // 2
        inv = [10000.0 ** (-2 * i / v.shape[0]) for i in range(half)]
        r = v.clone()
        for i in range(half):
            c, si = math.cos(s * inv[i]), math.sin(s * inv[i])
            r[i] = v[i] * c - v[i + half] * si
            r[i + half] = v[i + half] * c + v[i] * si
        return r

    ref = torch.zeros(2, 5, 16, dtype=torch.float64)
    for b in range(2):
        q = (x[b] @ attn.q_proj.weight.t()).view(5, 4, 4)
        k = (x[b] @ attn.k_proj.weight.t()).view(5, 2, 4)
        v = (x[b] @ attn.v_proj.weight.t()).view(5, 2, 4)
        heads = torch.zeros(5, 4, 4, dtype=torch.float64)
        for h in range(4):
            kv = h // 2  # GQA: heads 0,1 share kv head 0
            for i in range(5):
                qi = rope(q[i, h], i)
                scores = torch.stack([rope(k[j, kv], j) @ qi / 2.0 for j in range(i + 1)])
                p = torch.softmax(scores, 0)
                heads[i, h] = sum(p[j] * v[j, kv] for j in range(i + 1))
        ref[b] = heads.reshape(5, 16) @ attn.o_proj.weight.t()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw,message", [
    (dict(moe=MoEConfig(expert_type="clamped_swiglu"), first_dense_layers=1),
     "need every layer MoE"),
    (dict(moe=MoEConfig(expert_type="clamped_swiglu", swiglu_limit=0.0)), "swiglu_limit"),
    (dict(attn_sinks=True, n_kv_heads=4, mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8,
                                                      qk_rope_head_dim=4, v_head_dim=8)),
     "not MLA"),
    (dict(moe=MoEConfig(router=RouterConfig(kind="expert_choice", gate_bias=True))),
     "gate_bias needs kind=topk"),
])
def test_gpt_oss_options_that_do_not_combine_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw).check()


@pytest.mark.parametrize("window", [None, 3])
def test_attention_sinks_and_their_gradient_match_eager_attention(window):
    """GPT-OSS's sinks through scaled_dot_product_attention (a zero key whose logit is the
    sink) against eager softmax over [logits, sink] in float64: output and sink gradient."""
    from moe.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
               for h in (H, Hkv, Hkv))
    sinks = torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True)
    i = torch.arange(S)
    seen = i[None, :] <= i[:, None]
    if window:
        seen &= i[None, :] > i[:, None] - window
    logits = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) / D**0.5).masked_fill(
        ~seen, float("-inf"))
    probs = torch.cat([logits, sinks.view(1, H, 1, 1).expand(B, H, S, 1)], -1).softmax(-1)
    want = probs[..., :-1] @ v.repeat_interleave(H // Hkv, 1)
    got = causal_attention(q, k, v, window, None, sinks)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got, = torch.autograd.grad(got.square().sum(), sinks)
    g_want, = torch.autograd.grad(want.square().sum(), sinks)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"moe_layer_freq": 2, "first_dense_layers": 0},
        {"first_dense_layers": 1, "qk_norm": True, "tie_embeddings": True},
        {"moe": MoEConfig(num_experts=8, expert_ffn=16, num_shared_experts=1,
                          shared_expert_gate=True, kernel_backend="torch",
                          router=RouterConfig(top_k=2, score="sigmoid", expert_bias=True))},
    ],
)
def test_forward_backward_shapes(kw):
    cfg = tiny_config(**kw)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 64)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    assert len(out.routings) == n_moe
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_causal():
    model = MoETransformer(tiny_config()).double()
    ids = torch.randint(0, 64, (1, 10))
    a = model(ids).logits
    ids2 = ids.clone()
    ids2[0, 7] = (ids2[0, 7] + 1) % 64
    b = model(ids2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-6


def test_loss_terms_add_up():
    cfg = tiny_config()
    model = MoETransformer(cfg)
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    rc = cfg.moe.router
    expect = out.ce_loss + rc.aux_loss_coef * out.aux_loss + rc.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expect)
    aux = torch.stack([r.aux_loss for r in out.routings]).mean()
    torch.testing.assert_close(out.aux_loss, aux)


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(17).remainder(8).repeat(4, 1)  # a repeating pattern to memorise
    losses = []
    for _ in range(30):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_model_bad_input():
    model = MoETransformer(tiny_config())
    with pytest.raises(ValueError, match="integer"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 40, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model(torch.full((1, 4), 64))
    with pytest.raises(ValueError, match="n_kv_heads"):
        MoETransformer(tiny_config(n_heads=4, n_kv_heads=3))


def test_fresh_layer_parameters_are_initialised():
    from moe import MoELayer

    layer = MoELayer(16, MoEConfig(num_experts=4, expert_ffn=8, num_shared_experts=1,
                                   shared_expert_gate=True))
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all() and p.std() > 0, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_checkpointing_keeps_less_and_changes_no_gradient(backend):
    """set_activation_checkpointing("moe_act" / "mlp" / "block"): the same loss and
    gradients as keeping every activation (a dense layer, MoE layers with capacity drops and
    a shared expert), with fewer bytes saved for backward: block < mlp < moe_act < none."""
    torch.manual_seed(0)
    cfg = tiny_config(first_dense_layers=1, moe=MoEConfig(
        num_experts=4, expert_ffn=32, kernel_backend=backend, num_shared_experts=1,
        router=RouterConfig(top_k=2, capacity_factor=0.75)))
    model = MoETransformer(cfg)
    ids = torch.randint(0, 64, (2, 13))
    got = {}
    for mode in ("none", "moe_act", "mlp", "block"):
        model.set_activation_checkpointing(mode)
        model.zero_grad()
        saved, out = kept_bytes(lambda: model(ids[:, :-1], labels=ids[:, 1:]))
        out.loss.backward()
        assert any(bool(r.dropped.any()) for r in out.routings)
        got[mode] = (out.loss.detach(), saved,
                     {n: p.grad.clone() for n, p in model.named_parameters()})
    for mode in ("moe_act", "mlp", "block"):
        torch.testing.assert_close(got[mode][0], got["none"][0], rtol=0, atol=0)
        for name, g in got["none"][2].items():
            torch.testing.assert_close(got[mode][2][name], g, msg=lambda m, n=name: f"{n}: {m}")
    assert got["block"][1] < got["mlp"][1] < got["none"][1] / 1.5, {m: v[1] for m, v in
                                                                   got.items()}
    # moe_act: each MoE layer keeps its activation a [T * k, F] less (float32)
    moe_layers = sum(1 for layer in model.layers if hasattr(layer.mlp, "experts"))
    a_bytes = moe_layers * ids[:, :-1].numel() * 2 * cfg.moe.expert_ffn * 4
    assert got["none"][1] - got["moe_act"][1] == a_bytes
    assert not any(getattr(layer.mlp, "experts", None) is not None
                   and layer.mlp.experts.recompute_act for layer in model.layers)  # "block"
    with pytest.raises(ValueError, match="activation checkpointing"):
        model.set_activation_checkpointing("selective")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_autocast_over_float32_weights(backend):
    """Mixed precision (torch.autocast to bf16, float32 parameters): the experts' GEMMs run
    in bf16 on cast weights, the router in float32; the loss and the float32 gradients stay
    within bf16 rounding of the float32 model's."""
    torch.manual_seed(0)
    cfg = tiny_config(first_dense_layers=1, moe=MoEConfig(
        num_experts=4, expert_ffn=32, kernel_backend=backend, num_shared_experts=1,
        router=RouterConfig(top_k=2)))
    model = MoETransformer(cfg)
    ids = torch.randint(0, 64, (2, 13))
    ref = model(ids[:, :-1], labels=ids[:, 1:])
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(r.router_logits.dtype == torch.float32 for r in out.routings)
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2 * ref.loss.item()
    for name, p in model.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        rel = ((p.grad - want[name]).norm() / want[name].norm()).item()
        assert rel < 5e-2, (name, rel)


@pytest.mark.parametrize("kw,rope_dim", [
    ({}, 16), ({"qkv_bias": True}, 16), ({"qk_norm": True}, 16),  # Qwen2 bias, Qwen3 norms
    ({"qk_norm": True, "qk_norm_type": "full", "clip_qkv": 0.5}, 16),  # OLMoE
    ({}, 8)])  # partial rotary (GLM)
def test_fused_qkv_projects_as_the_three_projections(kw, rope_dim):
    """fuse_qkv (serving): one GEMM over a joint weight whose views the three projections
    become (no memory added, the state dict unchanged) gives the same q, k, v, for plain
    and left-padded (per-row) positions."""
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 16, **kw)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32)
    per_row = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    cs = [rope_cos_sin(torch.arange(5), rope_dim, 1e4, torch.float32),
          tuple(t.view(2, 5, -1) for t in rope_cos_sin(per_row.reshape(-1), rope_dim, 1e4,
                                                       torch.float32))]
    want = [attn.project(x, *c) for c in cs]
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    attn.fuse_qkv()
    w, b = attn.qkv
    assert w.shape == (4 * 16 + 2 * 2 * 16, 32) and (b is not None) == bool(kw.get("qkv_bias"))
    assert attn.q_proj.weight.data_ptr() == w.data_ptr()  # a view: no copy kept
    assert attn.v_proj.weight.data_ptr() == w[4 * 16 + 2 * 16:].data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in attn.state_dict().items())
    for c, ref in zip(cs, want, strict=True):
        for got, exp in zip(attn.project(x, *c), ref, strict=True):
            assert got.shape == exp.shape
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_fused_qkv_moves_only_the_joint_weight_to_the_device():
    """fuse_qkv(device) on host weights: the projections become views of the joint weight
    there (the model's .to() then leaves them be)."""
    attn = Attention(32, 4, 2, 16, qkv_bias=True)
    attn.fuse_qkv(torch.device("meta"))  # another device: new Parameters, views there
    w, b = attn.qkv
    assert w.is_meta and b.is_meta and attn.k_proj.weight.is_meta and attn.v_proj.bias.is_meta
    attn = Attention(32, 4, 2, 16, qkv_bias=True)
    attn.fuse_qkv(torch.device("cpu"))
    w, b = attn.qkv
    attn.to("cpu")  # already there: still views of the joint weight
    assert attn.q_proj.weight.data_ptr() == w.data_ptr()
    assert attn.v_proj.bias.data_ptr() == b[4 * 16 + 2 * 16:].data_ptr()
    assert isinstance(attn.k_proj.weight, torch.nn.Parameter)
