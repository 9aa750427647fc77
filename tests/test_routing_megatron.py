"""Our routers against megatron-core's (0.16.1), the router most MoE training runs use:
top-k selection and weights (softmax before or after the top-k, sigmoid with an expert bias,
group-limited, scaled), the Switch aux loss per micro-batch and per sequence, the z-loss,
capacity dropping by probability, the logit gradients of all of these together, the
aux-loss-free bias update, and the dispatch order and weighted combine (its permute and
unpermute). Both of our kernel backends (the torch reference and the Triton
kernels, under the interpreter on the CPU), fresh random inputs each run.

Where the two define a thing differently, the cases here stay where the definitions agree:
- megatron-core's aux loss counts the unbiased, ungrouped top-k of the scores (DeepSeek-V3's
  paper's f_i); ours counts the experts the tokens were sent to. With no expert bias and no
  groups these are the same slots.
- its "position" drop policy keeps an over-full expert's slots in whatever order torch.topk
  returns tied ones; ours keeps first choices before second ones, then token order (GShard).
  Its "probs" policy and ours agree (random weights have no ties).
- its group score is the sum of a group's top (k // topk_group) scores; ours is the best one
  ("max", DeepSeek-V2 as transformers reads it) or the two best ("top2", DeepSeek-V3): the
  cases take k // topk_group of 1 and 2.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kernels import sort_by_expert, topk_route, weighted_combine
from routing import RouterConfig, build_router
from tests.dist_utils import run_ranks
from tests.seeds import fresh_seed

pytest.importorskip("megatron.core", reason="megatron-core is a dev dependency (pyproject)")
BACKENDS = ["torch", "triton"]


def _moe_utils():
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe import moe_utils
    return moe_utils


def _dense(ids: torch.Tensor, values: torch.Tensor, E: int) -> torch.Tensor:
    """ids [T, k], values [T, k] -> [T, E] with values at their experts, 0 elsewhere."""
    return torch.zeros(ids.shape[0], E, dtype=values.dtype).scatter(1, ids, values)


# (name, E, k, score, renormalize (ours) / pre-softmax (megatron), scale, expert bias, groups)
SELECTIONS = [
    ("softmax, renormalised (Mixtral)", 8, 2, "softmax", True, 1.0, False, None),
    ("softmax, not renormalised (OLMoE, Qwen2)", 16, 4, "softmax", False, 1.0, False, None),
    ("sigmoid, expert bias, scaled (DeepSeek-V3)", 32, 6, "sigmoid", True, 2.5, True, None),
    ("sigmoid, bias, 8 groups, top-2 group score", 64, 8, "sigmoid", True, 2.5, True,
     (8, 4, True)),
    ("softmax, 4 groups, best-expert group score", 16, 2, "softmax", False, 1.0, False,
     (4, 2, False)),
    ("softmax, 4 groups, top-2 group score", 16, 4, "softmax", False, 1.0, False,
     (4, 2, True)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SELECTIONS, ids=[c[0] for c in SELECTIONS])
def test_topk_selection_and_weights_match_megatron(case, backend):
    """kernels.topk_route vs topk_routing_with_score_function: the same experts per token
    and the same combine weights, and the same logit gradient of a weighted sum of them."""
    _, E, k, score, renorm, scale, with_bias, groups = case
    g = torch.Generator().manual_seed(fresh_seed())
    T = 37
    logits = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.5 if with_bias else None
    up = torch.randn(T, E, generator=g)  # upstream gradient of the [T, E] weights

    mine = logits.clone().requires_grad_(True)
    ids, w = topk_route(mine, k, score, renorm, scale, bias, backend, groups)
    ours = _dense(ids, w, E)
    (ours * up).sum().backward()

    theirs_in = logits.clone().requires_grad_(True)
    probs, routing_map = _moe_utils().topk_routing_with_score_function(
        theirs_in, k, use_pre_softmax=score == "softmax" and not renorm,
        num_groups=groups[0] if groups else None, group_topk=groups[1] if groups else None,
        scaling_factor=scale if scale != 1.0 else None, score_function=score,
        expert_bias=bias)
    (probs * up).sum().backward()

    assert torch.equal(ours != 0, routing_map), "a token went to other experts"
    torch.testing.assert_close(ours, probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.grad, theirs_in.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drops", [False, True], ids=["drop-free", "with dropped slots"])
def test_dispatch_order_and_combine_match_megatron_permute(backend, drops):
    """sort_by_expert's rows are megatron-core's permute order (expert by expert, tokens in
    order within one), and weighted_combine of expert rows is its unpermute with probs, also
    with dropped slots (absent from its routing map)."""
    mu = _moe_utils()
    g = torch.Generator().manual_seed(fresh_seed())
    T, E, k, d = 29, 8, 3, 12
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]  # k distinct experts a token
    w = torch.rand(T, k, generator=g)
    dropped = torch.rand(T, k, generator=g) < 0.3 if drops else None
    x = torch.randn(T, d, generator=g)
    kept = torch.ones(T, k) if dropped is None else (~dropped).float()
    routing_map = _dense(ids, kept, E).bool()
    probs = _dense(ids, w * kept, E)

    disp = sort_by_expert(ids, E, dropped, backend)
    n = int(disp.expert_offsets[E])
    permuted, permuted_probs, order = mu.permute(x, routing_map, probs)
    assert torch.equal(disp.sorted_token_idx[:n], order)
    assert torch.equal(disp.tokens_per_expert, routing_map.sum(0))

    y = torch.randn(n, d, generator=g)  # expert outputs, in that row order
    rows = torch.cat([y, torch.full((T * k - n, d), float("nan"))])  # dropped rows unread
    want = mu.unpermute(y, order, x.shape, probs=probs, routing_map=routing_map)
    got = weighted_combine(rows, w if dropped is None else w.masked_fill(dropped, 0.0), disp,
                           backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted, x[disp.sorted_token_idx[:n]])
    torch.testing.assert_close(permuted_probs, (w * kept).reshape(-1)[disp.sorted_pair_idx[:n]])


# Megatron's whole TopKRouter.routing (z-loss, selection, capacity, aux losses attached to
# the weights' backward): (name, E, k, score, renormalize, aux type, capacity factor)
ROUTERS = [
    ("softmax k=2, micro-batch aux", 8, 2, "softmax", True, "micro_batch", None),
    ("softmax k=4 not renormalised, sequence aux", 16, 4, "softmax", False, "sequence", None),
    ("sigmoid k=3, micro-batch aux", 12, 3, "sigmoid", True, "micro_batch", None),
    ("softmax k=2, capacity 0.75 by probs", 8, 2, "softmax", True, "micro_batch", 0.75),
    ("sigmoid k=4, sequence aux, capacity 1.0", 16, 4, "sigmoid", True, "sequence", 1.0),
]
AUX, Z = 0.03, 0.002  # loss coefficients, the same on both sides


def _megatron_router(E, k, score, renorm, aux_type, cap, d):
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1, hidden_size=d, num_attention_heads=2, num_moe_experts=E,
        moe_router_topk=k, moe_router_score_function=score,
        moe_router_pre_softmax=score == "softmax" and not renorm,
        moe_router_load_balancing_type="aux_loss" if aux_type == "micro_batch"
        else "seq_aux_loss",
        moe_aux_loss_coeff=AUX, moe_z_loss_coeff=Z, moe_expert_capacity_factor=cap,
        moe_token_drop_policy="probs", moe_router_dtype="fp32", use_cpu_initialization=True)
    router = TopKRouter(cfg, pg_collection=_moe_utils().get_default_pg_collection())
    router.set_layer_number(1)
    return router.train()


def _routers_match_megatron(rank, world_size, seed):
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel()
        mu = _moe_utils()
        g = torch.Generator().manual_seed(seed)
        B, S, d = 3, 24, 16
        for name, E, k, score, renorm, aux_type, cap in ROUTERS:
            for backend in BACKENDS:
                where = f"{name}, {backend}"
                x = torch.randn(B, S, d, generator=g)
                W = torch.randn(E, d, generator=g) * d**-0.5
                up = torch.randn(B * S, E, generator=g)

                ours = build_router(RouterConfig(
                    top_k=k, score=score, renormalize=renorm, aux_loss_type=aux_type,
                    capacity_factor=cap, drop_policy="probs", aux_loss_coef=AUX,
                    z_loss_coef=Z), d, E, backend=backend)
                ours.weight.data.copy_(W)
                r = ours(x.reshape(B * S, d), seq_len=S)
                weights = _dense(r.expert_ids, r.combine_weights, E)
                loss = (weights * up).sum() + AUX * r.aux_loss + Z * r.z_loss
                loss.backward()

                # megatron's tokens are [S, B]: x goes in transposed, its outputs come back
                mu.clear_aux_losses_tracker()
                theirs = _megatron_router(E, k, score, renorm, aux_type, cap, d)
                W2 = W.clone().requires_grad_(True)
                probs, routing_map = theirs.routing(F.linear(x.transpose(0, 1), W2))

                def ours_order(t, E=E):  # [S * B, E] -> [B * S, E]
                    return t.view(S, B, E).transpose(0, 1).reshape(B * S, E)

                (ours_order(probs) * up).sum().backward()
                tracked = {n: v["values"][0] for n, v in
                           mu.get_moe_layer_wise_logging_tracker().items()}
                aux_name = "load_balancing_loss" if aux_type == "micro_batch" \
                    else "seq_load_balancing_loss"

                kept = (weights != 0) if cap else _dense(
                    r.expert_ids, torch.ones_like(r.combine_weights), E).bool()
                assert torch.equal(kept, ours_order(routing_map)), where
                if cap:
                    assert r.dropped.any(), f"{where}: the case should drop slots"
                torch.testing.assert_close(weights, ours_order(probs), rtol=1e-5, atol=1e-6,
                                           msg=lambda m, w=where: f"{w}: weights: {m}")
                torch.testing.assert_close(r.aux_loss.detach(), tracked[aux_name], rtol=1e-5,
                                           atol=1e-7, msg=lambda m, w=where: f"{w}: aux: {m}")
                torch.testing.assert_close(r.z_loss.detach(), tracked["z_loss"], rtol=1e-5,
                                           atol=1e-7, msg=lambda m, w=where: f"{w}: z: {m}")
                torch.testing.assert_close(ours.weight.grad, W2.grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, w=where: f"{w}: gate grad: {m}")

        # the aux-loss-free bias step (DeepSeek-V3): the same move from the same loads
        E = 16
        router = build_router(RouterConfig(top_k=2, score="sigmoid", expert_bias=True,
                                           expert_bias_update_rate=1e-3), 8, E)
        bias = torch.randn(E, generator=g) * 1e-2
        router.expert_bias.copy_(bias)
        half = torch.randint(-5, 6, (E // 2,), generator=g)
        half[0] = 0  # an expert exactly at the mean load keeps its bias
        loads = (10 + torch.cat([half, -half]))[torch.randperm(E, generator=g)]
        want = mu.get_updated_expert_bias(loads.float(), bias.clone(), 1e-3)
        router.update_expert_bias(loads)
        torch.testing.assert_close(router.expert_bias, want)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_router_losses_drops_and_gradients_match_megatron():
    """Our TopKRouter vs megatron-core's TopKRouter.routing on the same logits, both
    backends: kept slots, combine weights, aux (micro-batch and per sequence) and z losses,
    and the gate weight's gradient of weights * upstream + both losses (megatron attaches
    its losses to the weights' backward)."""
    run_ranks(_routers_match_megatron, 1, fresh_seed())
