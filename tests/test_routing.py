"""Routers, losses and capacity on small hand-computed cases, and their input checks."""

from __future__ import annotations

import math

import pytest
import torch

from moe import MoEConfig, MoELayer
from routing import (
    RouterConfig,
    aux_free_bias_update,
    build_router,
    capacity_drop_mask,
    expert_capacity,
    router_z_loss,
    scheduled,
    set_routing_step,
    switch_aux_loss,
)

PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)


def test_switch_aux_loss_top1_by_hand():
    ids = PROBS.argmax(-1, keepdim=True)  # experts 0, 0, 1, 0
    # f = [3/4, 1/4], P = [0.65, 0.35]: 2 * (0.4875 + 0.0875)
    assert switch_aux_loss(PROBS, ids, 2).item() == pytest.approx(1.15, abs=1e-12)


def test_switch_aux_loss_top2_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 2]])
    # f = [1/4, 2/4, 1/4], P = [0.3, 0.45, 0.25]: 3 * 0.3625
    assert switch_aux_loss(probs, ids, 3).item() == pytest.approx(1.0875, abs=1e-12)


def test_switch_aux_loss_balanced_is_one():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    ids = torch.arange(T).remainder(E)[:, None]
    assert switch_aux_loss(probs, ids, E).item() == pytest.approx(1.0)


def test_switch_aux_loss_per_sequence_by_hand():
    ids = PROBS.argmax(-1, keepdim=True)
    # sequence 1: f=[1, 0], P=[0.85, 0.15] -> 1.7 ; sequence 2: f=[.5,.5], P=[.45,.55] -> 1.0
    assert switch_aux_loss(PROBS, ids, 2, seq_len=2).item() == pytest.approx(1.35, abs=1e-12)
    with pytest.raises(ValueError, match="sequences of length 3"):
        switch_aux_loss(PROBS, ids, 2, seq_len=3)


def test_switch_aux_loss_one_batch_equals_the_per_sequence_path():
    """The one-batch path (all slots used, one sequence) and the general one agree, value and
    gradient, on random probabilities."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(12, 6, generator=g, dtype=torch.float64), -1)
    ids = torch.rand(12, 6, generator=g).topk(3, dim=-1).indices
    a = probs.clone().requires_grad_(True)
    b = probs.clone().requires_grad_(True)
    fast = switch_aux_loss(a, ids, 6)
    general = switch_aux_loss(b, ids, 6, used=torch.ones(12, 3, dtype=torch.bool))
    fast.backward()
    general.backward()
    assert fast.item() == pytest.approx(general.item(), abs=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, abs=1e-12)


def test_aux_free_bias_update_by_hand():
    bias = torch.tensor([0.1, 0.0, 0.0, -0.1], dtype=torch.float64)
    tokens = torch.tensor([10, 2, 4, 0])  # mean load 4
    new = aux_free_bias_update(bias, tokens, 0.01)
    torch.testing.assert_close(new, torch.tensor([0.09, 0.01, 0.0, -0.09], dtype=torch.float64))


def test_router_update_expert_bias_in_place():
    cfg = RouterConfig(top_k=1, score="sigmoid", expert_bias=True, expert_bias_update_rate=0.5)
    r = build_router(cfg, 4, 3)
    r.update_expert_bias(torch.tensor([5, 1, 0]))
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="no expert_bias"):
        build_router(RouterConfig(top_k=1), 4, 3).update_expert_bias(torch.tensor([1, 1, 1]))


def test_capacity_position_policy_by_hand():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    cap = expert_capacity(4, 2, 2, 0.5)
    assert cap == 2
    dropped = capacity_drop_mask(ids, torch.rand(4, 2), 2, cap, "position")
    assert dropped.tolist() == [[False, False], [False, True], [False, True], [True, True]]


def test_capacity_rounds_up():
    """ceil(capacity_factor * T * k / E), as GShard / Switch size an expert's buffer: 1.25 *
    10 * 2 / 4 = 6.25 slots -> 7; an exact product stays."""
    assert expert_capacity(10, 2, 4, 1.25) == 7
    assert expert_capacity(8, 2, 4, 1.0) == 4
    assert expert_capacity(3, 1, 4, 0.1) == 1


def test_capacity_probs_policy_by_hand():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    w = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    dropped = capacity_drop_mask(ids, w, 2, 2, "probs")
    assert dropped.tolist() == [[False, True], [True, False], [False, True], [False, True]]


def test_capacity_skips_slots_the_router_left_empty():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    skip = torch.tensor([[False, True], [False, True], [False, False], [False, True]])
    dropped = capacity_drop_mask(ids, torch.rand(4, 2), 2, 2, "position", skip=skip)
    # expert 0 takes the first choices of tokens 0 and 1, then is full; skipped slots are
    # neither counted nor dropped
    assert dropped.tolist() == [[False, False], [False, False], [False, True], [True, False]]


def naive_capacity_drop(ids, w, E, cap, policy, skip):
    """Slot by slot in priority order (position: slot-major; probs: weight, then position),
    each expert keeping its first cap slots that are not skipped."""
    T, k = ids.shape
    slots = [(j * T + t, t, j) for j in range(k) for t in range(T)]
    if policy == "probs":
        slots.sort(key=lambda s: (-w[s[1], s[2]].item(), s[0]))
    taken, dropped = [0] * E, torch.zeros(T, k, dtype=torch.bool)
    for _, t, j in slots:
        if skip is not None and skip[t, j]:
            continue
        e = ids[t, j].item()
        dropped[t, j] = taken[e] >= cap
        taken[e] += 1
    return dropped


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("T,E,k,with_skip", [(37, 8, 2, False), (50, 16, 4, True),
                                              (9, 4, 1, False), (0, 4, 2, False)])
def test_capacity_drop_mask_matches_a_slot_by_slot_loop(T, E, k, with_skip, policy, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(T * 100 + E + k)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.int64)
    ids = torch.where(torch.rand(T, k, generator=g) < 0.5, ids % 2, ids)  # skewed: 0 and 1
    w = torch.rand(T, k, generator=g)
    skip = torch.rand(T, k, generator=g) < 0.3 if with_skip else None
    cap = expert_capacity(max(T, 1), k, E, 0.7)
    got = capacity_drop_mask(ids, w, E, cap, policy, skip, backend=backend)
    assert torch.equal(got, naive_capacity_drop(ids, w, E, cap, policy, skip))


def test_threshold_routing_by_hand():
    """Each token takes its best experts until their probability reaches the threshold."""
    r = build_router(RouterConfig(kind="threshold", top_k=3, threshold=0.6), 3, 4).double()
    with torch.no_grad():  # logits = (x0, x1, x2, 0)
        r.weight.zero_()
        r.weight[:3].copy_(torch.eye(3, dtype=torch.float64))
    # probabilities (.95, .02, .02, .02): one expert; (.40, .45, 0, .15): two; all .25: k
    x = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.1, -9.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    routing = r(x)
    used = (~routing.dropped).sum(-1).tolist()
    assert used == [1, 2, 3]
    assert routing.expert_ids[0, 0] == 0 and routing.expert_ids[1, 0] == 1
    torch.testing.assert_close(routing.combine_weights.sum(-1), torch.ones(3, dtype=torch.float64))
    assert routing.experts_per_token.item() == pytest.approx(2.0)
    assert routing.dropped_fraction.item() == 0.0  # empty slots are not drops
    assert routing.tokens_per_expert.sum().item() == 6
    seen = []  # the experts get the used slots only, not k rows a token
    layer = MoELayer(3, MoEConfig(num_experts=4, expert_ffn=4, router=r.cfg,
                                  kernel_backend="torch")).double()
    layer.router = r
    layer.experts.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    layer(x)
    assert int(seen[0].expert_offsets[-1]) == 6
    ids, w = r.select(x)  # inference: the same choice, empty slots weigh 0
    assert torch.equal(ids, routing.expert_ids)
    torch.testing.assert_close(w, routing.combine_weights)


def test_k_schedule_moves_top_k_and_threshold():
    cfg = RouterConfig(kind="threshold", top_k=2, threshold=0.5, schedule_steps=4,
                       top_k_start=8, threshold_start=1.0)
    cfg.check(8)
    assert [scheduled(cfg, s) for s in (0, 1, 2, 4, 100)] == [
        (8, 1.0), (7, 0.875), (5, 0.75), (2, 0.5), (2, 0.5)]
    layer = MoELayer(6, MoEConfig(num_experts=8, expert_ffn=4, router=cfg,
                                  kernel_backend="torch"))
    x = torch.randn(5, 6)
    set_routing_step(layer, 0)  # dense: every token takes all 8 experts
    assert layer(x)[1].experts_per_token.item() == 8
    set_routing_step(layer, 4)
    routing = layer(x)[1]
    assert routing.top_k == 2 and routing.experts_per_token.item() <= 2
    assert cfg.top_k == 2 and cfg.top_k_start == 8  # the config itself never changes
    plain = RouterConfig(top_k=3)
    assert scheduled(plain, 0) == scheduled(plain, 50) == (3, plain.threshold)


@pytest.mark.parametrize("kw,message", [
    (dict(kind="threshold", threshold=0.0), "threshold must be in"),
    (dict(kind="threshold", threshold=1.5), "threshold must be in"),
    (dict(kind="threshold", score="sigmoid"), "score=softmax"),
    (dict(entropy_loss_coef=0.1, score="sigmoid"), "entropy_loss_coef"),
    (dict(entropy_loss_coef=-1.0), "entropy_loss_coef"),
    (dict(kind="expert_choice", entropy_loss_coef=0.1), "entropy_loss_coef"),
    (dict(top_k_start=4), "schedule_steps=0"),
    (dict(top_k_start=9, schedule_steps=3), "top_k_start=9"),
    (dict(threshold_start=0.9, schedule_steps=3), "needs kind=threshold"),
    (dict(kind="hash", top_k_start=4, schedule_steps=3), "needs kind=topk or threshold"),
    (dict(schedule_steps=-1), "schedule_steps"),
    (dict(kind="rand"), "threshold"),
])
def test_threshold_and_schedule_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kw).check(8)


def test_sigmoid_bias_changes_selection_not_weights():
    cfg = RouterConfig(top_k=2, score="sigmoid", renormalize=True, expert_bias=True)
    r = build_router(cfg, 6, 5).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    with torch.no_grad():
        r.expert_bias[4] = 100.0
    routing = r(x)
    assert torch.all((routing.expert_ids == 4).any(-1))
    scores = torch.sigmoid(x @ r.weight.t())
    expect = scores.gather(1, routing.expert_ids)
    torch.testing.assert_close(routing.combine_weights, expect / expect.sum(-1, keepdim=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_limited_routing_by_hand(backend):
    """4 experts in 2 groups, one group kept: V2 scores a group by its best expert, V3 by its
    two best (with the bias); the weights are the unbiased scores of the chosen experts. The
    torch ops and the fused Triton kernel alike."""
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0]], dtype=torch.float64)
    if backend == "triton":
        logits = logits.float()  # Triton kernels take 32-bit logits
    v2 = RouterConfig(top_k=2, renormalize=False, n_group=2, topk_group=1, group_score="max",
                      routed_scaling_factor=2.0)
    r = build_router(v2, 4, 4, backend=backend).to(logits.dtype)
    ids, w = r._select(logits)[:2]
    probs = logits.softmax(-1)
    assert sorted(ids[0].tolist()) == [0, 1]  # group 0 holds the best expert
    torch.testing.assert_close(w, (2.0 * probs.gather(1, ids)).to(w.dtype))
    v3 = RouterConfig(top_k=2, score="sigmoid", expert_bias=True, n_group=2, topk_group=1,
                      group_score="top2")
    r = build_router(v3, 4, 4, backend=backend).to(logits.dtype)
    ids, w = r._select(logits)[:2]
    assert sorted(ids[0].tolist()) == [2, 3]  # 0.73 + 0.73 beats 0.95 + 0.05
    with torch.no_grad():
        r.expert_bias[1] = 1.0  # 0.95 + 1.05 now wins: selection moves, weights unbiased
    ids, w = r._select(logits)[:2]
    assert sorted(ids[0].tolist()) == [0, 1]
    s = logits.sigmoid().gather(1, ids)
    torch.testing.assert_close(w, (s / s.sum(-1, keepdim=True)).to(w.dtype))


@pytest.mark.parametrize("kw,message", [
    (dict(n_group=3), "divisible"), (dict(n_group=2, topk_group=3), "topk_group=3"),
    (dict(n_group=4, topk_group=1, top_k=3), "top_k=3 exceeds"),
    (dict(n_group=2, group_score="mean"), "group_score"),
    (dict(n_group=4, topk_group=4, group_score="top2"), "at least 2 experts per group")])
def test_group_limited_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kw).check(4)


def test_expert_choice_gives_every_expert_its_capacity():
    cfg = RouterConfig(kind="expert_choice", top_k=2)
    r = build_router(cfg, 6, 4).double()
    routing = r(torch.randn(10, 6, dtype=torch.float64))
    assert routing.tokens_per_expert.tolist() == [5, 5, 5, 5]  # ceil(2 * 10 / 4)
    assert int((~routing.dropped).sum()) == 20


def test_hash_router_is_fixed_per_token():
    r = build_router(RouterConfig(kind="hash", top_k=2), 6, 8, vocab_size=30)
    ids = torch.tensor([3, 7, 3, 29])
    routing = r(torch.randn(4, 6), token_ids=ids)
    assert torch.equal(routing.expert_ids[0], routing.expert_ids[2])
    assert torch.all(routing.expert_ids[:, 0] != routing.expert_ids[:, 1])
    assert torch.all(routing.combine_weights == 0.5)
    with pytest.raises(ValueError, match="token ids"):
        r(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        r(torch.randn(1, 6), token_ids=torch.tensor([30]))


@pytest.mark.parametrize("kind", ["topk", "expert_choice"])
def test_bad_input_errors(kind):
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and num_experts=8"):
        build_router(RouterConfig(kind=kind, top_k=9), 4, 8)
    r = build_router(RouterConfig(kind=kind, top_k=2), 4, 8)
    with pytest.raises(ValueError, match="hidden size 5 does not match"):
        r(torch.randn(3, 5))
    with pytest.raises(ValueError, match="floating-point"):
        r(torch.ones(3, 4, dtype=torch.int64))
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        r(x)


def test_layer_bad_input_errors():
    layer = MoELayer(4, MoEConfig(num_experts=4, expert_ffn=8, kernel_backend="torch"))
    with pytest.raises(ValueError, match="hidden size 6 does not match"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="floating point"):
        layer(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="top_k=5"):
        MoELayer(4, MoEConfig(num_experts=4, router=RouterConfig(top_k=5)))
    with pytest.raises(ValueError, match="expert_type"):
        MoELayer(4, MoEConfig(expert_type="relu6"))
    seq = MoELayer(4, MoEConfig(num_experts=4, router=RouterConfig(aux_loss_type="sequence")))
    with pytest.raises(ValueError, match="sequence length"):
        seq(torch.randn(6, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_global_batch_aux_loss_in_one_process_is_the_micro_batch_loss(kind, backend):
    """aux_loss_type=global_batch without a count reducer (one process holds the batch)
    gives the micro-batch loss and gradient; a reducer gets the [E] counts (also with 0
    tokens: it is a collective) and its sums set the frequencies."""
    from routing.losses import global_batch_aux_loss

    torch.manual_seed(0)
    x = torch.randn(23, 16)
    got = {}
    for aux_type in ("micro_batch", "global_batch"):
        torch.manual_seed(1)
        r = build_router(RouterConfig(kind=kind, top_k=3, aux_loss_type=aux_type), 16, 8,
                         backend=backend)
        routing = r(x)
        routing.aux_loss.backward()
        got[aux_type] = (routing.aux_loss.detach(), r.weight.grad.clone())
    torch.testing.assert_close(got["global_batch"][0], got["micro_batch"][0])
    torch.testing.assert_close(got["global_batch"][1], got["micro_batch"][1])

    seen = []

    def double(c):  # as if a second rank had routed the same
        seen.append(c.clone())
        return 2 * c

    probs = torch.softmax(torch.randn(5, 4), -1)
    ids = torch.tensor([[0, 1]] * 5)
    assert global_batch_aux_loss(probs, ids, 4, reduce=double).item() == pytest.approx(
        4 * 0.5 * (probs[:, 0].mean() + probs[:, 1].mean()).item())
    assert seen[0].tolist() == [5.0, 5.0, 0.0, 0.0]
    empty = global_batch_aux_loss(probs[:0], ids[:0], 4, reduce=double)
    assert empty.item() == 0.0 and len(seen) == 2
