"""DP, EP, EP+DP and FSSDP on 2 and 4 real gloo processes against one process on the same
global batch: same losses, same parameters after the update, balanced and skewed routing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe import ModelConfig, MoEConfig, MoELayer, MoETransformer
from parallel import ParallelConfig, init_distributed, parallelize
from routing import RouterConfig
from tests.dist_utils import run_ranks

B, S, STEPS, LR = 2, 8, 2, 0.5


def build_model(skewed: bool | str, capacity: float | None, num_experts: int = 4
                ) -> MoETransformer:
    """Identical on every rank (seeded). skewed: expert 0 is in every token's top-2;
    "gpt_oss": GPT-OSS's parts (attention sinks, biases on attention, gate and experts,
    clamped SwiGLU experts), every bias random; "threshold": threshold routing (1 or 2
    experts a token) with its entropy loss; "recompute-mlp" / "recompute-block" /
    "recompute-moe_act": the plain model with that activation checkpointing; "triton": the
    plain model on the Triton backend (its interpreter on the CPU)."""
    torch.manual_seed(0)
    gpt_oss = skewed == "gpt_oss"
    if skewed is True:
        router = RouterConfig(top_k=2, score="sigmoid", expert_bias=True,
                              capacity_factor=capacity)
    elif skewed == "global":
        router = RouterConfig(top_k=2, aux_loss_type="global_batch", aux_loss_coef=0.5,
                              capacity_factor=capacity)
    elif skewed == "threshold":
        router = RouterConfig(kind="threshold", top_k=3, threshold=0.5, entropy_loss_coef=0.5,
                              capacity_factor=capacity)
    else:
        router = RouterConfig(top_k=2, capacity_factor=capacity, gate_bias=gpt_oss)
    moe = MoEConfig(num_experts=num_experts, expert_ffn=24, router=router,
                    kernel_backend="triton" if skewed == "triton" else "torch")
    if gpt_oss:
        moe.expert_type, moe.expert_bias, moe.swiglu_limit = "clamped_swiglu", True, 0.5
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=16, dense_ffn=48, moe=moe, qkv_bias=gpt_oss, o_bias=gpt_oss,
                      attn_sinks=gpt_oss)
    model = MoETransformer(cfg)
    if isinstance(skewed, str) and skewed.startswith("recompute-"):
        model.set_activation_checkpointing(skewed.split("-")[1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gpt_oss and name.endswith(("bias", "b_in", "b_out", "sinks")):
                p.normal_(0, 0.5)
        for layer in model.layers:
            if skewed is True:
                layer.mlp.router.expert_bias[0] = 10.0
            if skewed == "threshold":  # tokens take 1 or 2 experts
                layer.mlp.router.weight.normal_(0, 0.25)
    return model


def batches(world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 64, (world * B, S + 1), generator=g) for _ in range(STEPS)]


def reference(world: int, skewed: bool, capacity: float | None):
    """One process, the same global batch as `world` micro-batches: losses and final state."""
    model = build_model(skewed, capacity)
    model.set_activation_checkpointing("none")  # the reference keeps every activation
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for ids in batches(world):
        per_rank = [model(ids[r * B:(r + 1) * B, :-1], labels=ids[r * B:(r + 1) * B, 1:]).loss
                    for r in range(world)]
        torch.stack(per_rank).mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append([loss.item() for loss in per_rank])
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def _worker(rank, world, pcfg, scenarios, out_path):
    mesh = init_distributed(pcfg)
    results = {}
    for skewed, capacity in scenarios:
        par = parallelize(build_model(skewed, capacity), mesh,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=LR))
        if skewed == "recompute-moe_act":  # EP's and FSSDP's own experts took the setting
            assert all(m.experts.recompute_act for m in par.model.modules()
                       if isinstance(m, MoELayer)), type(par.model.layers[0].mlp.experts)
        losses, moved = [], []
        for ids in batches(world):
            local = ids[rank * B:(rank + 1) * B]
            par.counters.reset()
            with mesh.guard():
                out = par.module(local[:, :-1], labels=local[:, 1:])
                par.backward(out.loss)
                par.step()
            losses.append(out.loss.item())
            moved.append(par.counters.snapshot())
        _collect(results, (skewed, capacity), par, losses, world, rank, moved=moved)
    if rank == 0:
        torch.save(results, out_path)
    mesh.close()


def _collect(results, key, par, losses, world, rank, **extra):
    """Rank 0 files every rank's losses, the canonical state and extra under key."""
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    state = par.full_state_dict()  # collective: every rank takes part
    if rank == 0:
        results[key] = dict(losses=all_losses, state=state, **extra)


CASES = {
    # id: (world, ParallelConfig kwargs)
    "dp-2": (2, dict(mode="dp")),
    "ep-2": (2, dict(mode="ep")),
    "fssdp-2": (2, dict(mode="fssdp")),
    "fssdp-fsdp2-2": (2, dict(mode="fssdp", dense="fsdp2")),
    "fssdp-remat-2": (2, dict(mode="fssdp", rematerialize=True)),
    "fssdp-deepspeed-2": (2, dict(mode="fssdp", dense="deepspeed", zero_stage=2)),
    "ep-deepspeed-zero1-2": (2, dict(mode="ep", dense="deepspeed", zero_stage=1)),
    "dp-4": (4, dict(mode="dp")),
    "ep-4": (4, dict(mode="ep")),
    "ep2-dp2-4": (4, dict(mode="ep", ep_size=2)),
    "fssdp-4": (4, dict(mode="fssdp")),
}
SCENARIOS = [(False, None), (True, None), (False, 0.75)]


@pytest.mark.parametrize("case", list(CASES))
def test_same_losses_and_update_as_one_process(case, tmp_path):
    check_against_one_process(case, SCENARIOS, tmp_path)


@pytest.mark.parametrize("case", ["ep-2", "fssdp-2"])
def test_gpt_oss_parts_and_threshold_routing_train_alike_under_ep_and_fssdp(case, tmp_path):
    """Expert biases travel with their experts (EP slices, FSSDP shards), and sinks and the
    other biases are trained like dense weights; threshold routing's empty slots are not
    sent, with and without a capacity."""
    check_against_one_process(case, [("gpt_oss", None), ("threshold", None),
                                     ("threshold", 0.5)], tmp_path)


@pytest.mark.parametrize("case", ["ep-2", "fssdp-fsdp2-2"])
def test_activation_checkpointing_trains_alike_under_ep_and_fssdp(case, tmp_path):
    """Recomputed MLPs or blocks re-run their collectives in backward (EP's all-to-alls,
    FSSDP's sparse all-gather; FSDP2 gathers the block again), and the experts' recomputed
    SwiGLU activation (moe_act) reaches EP's and FSSDP's experts: same update as one process
    that keeps every activation, with and without capacity drops."""
    check_against_one_process(case, [("recompute-block", None), ("recompute-mlp", 0.75),
                                     ("recompute-moe_act", 0.75)], tmp_path)


@pytest.mark.parametrize("case", ["ep-2", "fssdp-2"])
def test_the_triton_backend_trains_as_one_process_under_ep_and_fssdp(case, tmp_path):
    """On the Triton kernels, the combine inside the experts: EP's experts apply each
    received row's combine weight in the GEMM epilogue (one slot a token) and give its
    gradient from the backward's; FSSDP's gathered experts combine as one process's do.
    Same losses and update as one process on the same kernels, with capacity drops."""
    check_against_one_process(case, [("triton", 1.0)], tmp_path)


def check_against_one_process(case, scenarios, tmp_path):
    world, kw = CASES[case]
    out = tmp_path / "result.pt"
    run_ranks(_worker, world, ParallelConfig(timeout_s=60, **kw), scenarios, str(out))
    results = torch.load(out, weights_only=False)
    for skewed, capacity in scenarios:
        got = results[(skewed, capacity)]
        ref_losses, ref_state = reference(world, skewed, capacity)
        what = f"{case}, skewed={skewed}, capacity={capacity}"
        # got["losses"][r][step] vs ref_losses[step][r]
        torch.testing.assert_close(torch.tensor(got["losses"]).t(), torch.tensor(ref_losses),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"{w}: losses {m}")
        assert set(got["state"]) == set(ref_state), what
        for name, ref in ref_state.items():
            torch.testing.assert_close(got["state"][name].cpu(), ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, w=what: f"{w}: {n} {m}")


def _adamw(ps):
    return torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)


def _optim_worker(rank, world, pcfg, saved_path, out_path):
    """Train STEPS steps with AdamW (or, given saved_path, load that canonical state); rank 0
    writes the canonical optimizer state and weights."""
    mesh = init_distributed(pcfg)
    par = parallelize(build_model(False, None), mesh, optimizer=_adamw)
    if saved_path is None:
        for ids in batches(world):
            local = ids[rank * B:(rank + 1) * B]
            with mesh.guard():
                par.backward(par.module(local[:, :-1], labels=local[:, 1:]).loss)
                par.step()
    else:
        saved = torch.load(saved_path, weights_only=False)
        par.load_full_state_dict(saved["model"])
        par.load_optimizer_state(saved["optim"])
    optim, model = par.optimizer_state(), par.full_state_dict()
    if rank == 0:
        torch.save({"optim": optim, "model": model}, out_path)
    mesh.close()


def test_deepspeed_builds_no_shared_memory_op_for_training():
    """DeepSpeed's CPU shared-memory all-reduce (a C++ op its comm backend compiled on start,
    a minute or more; only its inference all-reduce uses it) is marked not compatible before
    an engine starts, so DeepSpeed's own loader declines to build it."""
    import deepspeed
    from deepspeed.comm.torch import build_shm_op

    from parallel.api import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op(deepspeed)
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None


@pytest.mark.parametrize("mode,stage", [("fssdp", 2), ("ep", 1)])
def test_deepspeed_optimizer_state_is_canonical_and_reshards(tmp_path, mode, stage):
    """ZeRO-partitioned AdamW moments gathered per parameter equal one process's AdamW state
    on the same global batches, and load back on another number of ranks unchanged."""
    cfg = dict(mode=mode, dense="deepspeed", zero_stage=stage, timeout_s=60)
    run_ranks(_optim_worker, 2, ParallelConfig(**cfg), None, str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    # one process, the same global batches
    model = build_model(False, None)
    ref = parallelize(model, None, optimizer=_adamw)
    for ids in batches(2):
        torch.stack([model(ids[r * B:(r + 1) * B, :-1], labels=ids[r * B:(r + 1) * B, 1:]).loss
                     for r in range(2)]).mean().backward()
        ref.step()
    want = ref.optimizer_state()
    assert set(two["optim"]) == set(want)
    for key, v in want.items():
        torch.testing.assert_close(two["optim"][key].float(), v.float(), rtol=1e-4, atol=1e-7,
                                   msg=lambda m, k=key: f"{k}: {m}")
    # the same state loaded on 1 and on 4 ranks comes back unchanged
    for world in (1, 4):
        out = tmp_path / f"re{world}.pt"
        cfg_w = dict(cfg, mode="dp") if world == 1 else cfg
        run_ranks(_optim_worker, world, ParallelConfig(**cfg_w), str(tmp_path / "two.pt"),
                  str(out))
        back = torch.load(out, weights_only=False)
        assert set(back["optim"]) == set(two["optim"])
        for key, v in two["optim"].items():
            torch.testing.assert_close(back["optim"][key], v, msg=lambda m, k=key: f"{k}: {m}")


ACCUM = 2  # micro-batches a step in the gradient-accumulation tests (B // ACCUM rows each)


def _accum_worker(rank, world, pcfg, scenarios, out_path):
    """STEPS steps of ACCUM micro-batches each; DDP's all-reduces counted per micro-batch."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    mesh = init_distributed(pcfg)
    results = {}
    for skewed, capacity in scenarios:
        par = parallelize(build_model(skewed, capacity), mesh,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=LR), grad_accum=ACCUM)
        syncs = [0] * ACCUM
        micro = [0]
        if isinstance(par.module, torch.nn.parallel.DistributedDataParallel):
            def counting(state, bucket, syncs=syncs, micro=micro):
                syncs[micro[0]] += 1
                return allreduce_hook(state, bucket)

            par.module.register_comm_hook(None, counting)
        losses = []
        for ids in batches(world):
            local = ids[rank * B:(rank + 1) * B]
            step = []
            with mesh.guard():
                for m in range(ACCUM):
                    micro[0] = m
                    rows = local[m * B // ACCUM:(m + 1) * B // ACCUM]
                    with par.micro_batch(m):
                        out = par.module(rows[:, :-1], labels=rows[:, 1:])
                        par.backward(out.loss)
                    step.append(out.loss.item())
                par.step()
            losses.append(step)
        _collect(results, (skewed, capacity), par, losses, world, rank, syncs=syncs)
    if rank == 0:
        torch.save(results, out_path)
    mesh.close()


@pytest.mark.parametrize("case", ["ep-2", "fssdp-fsdp2-2", "fssdp-deepspeed-2"])
def test_gradient_accumulation_matches_one_process_over_every_micro_batch(case, tmp_path):
    """ACCUM micro-batches a step on each rank (Parallelized.micro_batch) give one process's
    update over all of them (each loss counted 1 / (ranks x ACCUM)), with DDP, FSDP2 or
    DeepSpeed ZeRO-2 for the dense weights and EP or FSSDP for the experts, capacity
    dropping included; DDP all-reduces in the last micro-batch's backward only."""
    world, kw = CASES[case]
    scenarios = [(False, None), (False, 0.75)]
    out = tmp_path / "result.pt"
    run_ranks(_accum_worker, world, ParallelConfig(timeout_s=60, **kw), scenarios, str(out))
    results = torch.load(out, weights_only=False)
    n = B // ACCUM
    for skewed, capacity in scenarios:
        got, what = results[(skewed, capacity)], f"{case}, capacity={capacity}"
        model = build_model(skewed, capacity)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step, ids in enumerate(batches(world)):
            per = [[model(ids[r * B + m * n:r * B + (m + 1) * n, :-1],
                          labels=ids[r * B + m * n:r * B + (m + 1) * n, 1:]).loss
                    for m in range(ACCUM)] for r in range(world)]
            torch.stack([x for r in per for x in r]).mean().backward()
            opt.step()
            opt.zero_grad()
            want = torch.tensor([[x.item() for x in r] for r in per])
            have = torch.tensor([got["losses"][r][step] for r in range(world)])
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, w=what: f"{w}: losses {m}")
        for name, ref in model.state_dict().items():
            torch.testing.assert_close(got["state"][name].cpu(), ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, nm=name, w=what: f"{w}: {nm} {m}")
        if case == "ep-2":
            assert got["syncs"][0] == 0 and got["syncs"][-1] > 0, got["syncs"]


def _amp_worker(rank, world, pcfg, out_path):
    """One FSSDP (or EP) step's forward and backward in float32 and under bf16 autocast."""
    mesh = init_distributed(pcfg)
    ids = batches(world)[0][rank * B:(rank + 1) * B]
    got = {}
    for amp in (False, True):
        par = parallelize(build_model(False, None), mesh)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = par.module(ids[:, :-1], labels=ids[:, 1:])
        par.backward(out.loss)
        grads = {n: p.grad.clone() for n, p in par.model.named_parameters()
                 if p.grad is not None}
        got[amp] = dict(loss=out.loss.item(), moved=par.counters.snapshot(), grads=grads)
    got["kept"] = _kept_apart_and_fused(par.model)
    torch.save(got, f"{out_path}.{rank}")
    mesh.close()


def _kept_apart_and_fused(model) -> dict:
    """A parallelized MoE layer's forward as it runs (FSSDP: the gathered experts combine;
    EP: each row's weight travels with it and the experts apply it) and with the experts'
    outputs y combined apart, as before: the bytes each keeps for the backward, and both
    ones' outputs and input gradients."""
    from bench.train_memory import kept_bytes
    from kernels import sort_by_expert, weighted_combine
    from parallel.comm import all_to_all

    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    torch.manual_seed(dist.get_rank())
    x = torch.randn(13, layer.d_model, requires_grad=True)

    def apart():
        r = layer.router(x)
        T, k = r.expert_ids.shape
        ep = getattr(layer.dispatch, "group", None)
        d = sort_by_expert(r.expert_ids, r.num_experts, None, "torch")
        if ep is None:  # FSSDP: the experts' rows, then the combine
            return weighted_combine(layer.experts(x, d), r.combine_weights, d)
        P, E_local, n = layer.dispatch.P, layer.dispatch.E_local, T * k
        send = d.tokens_per_expert.view(P, E_local).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ep)
        to, back = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = all_to_all(x.index_select(0, d.sorted_token_idx), to, back, ep, None, "x")
        local = torch.arange(E_local).repeat(P).repeat_interleave(recv.reshape(-1))
        y = layer.experts(x_recv, sort_by_expert(local[:, None], E_local), y_grouped=False)
        y = all_to_all(y, back, to, ep, None, "y")
        return weighted_combine(y[:n], r.combine_weights, d)

    got = {}
    for name, fn in (("apart", apart), ("fused", lambda: layer(x)[0])):
        kept, out = kept_bytes(fn)
        x.grad = None
        out.square().sum().backward()
        got[name] = dict(kept=kept, out=out.detach(), dx=x.grad.clone())
    got["y_bytes"] = x.shape[0] * layer.cfg.router.top_k * layer.d_model * x.element_size()
    return got


@pytest.mark.parametrize("case", ["fssdp-2", "ep-2"])
def test_bf16_autocast_halves_what_crosses_and_keeps_float32_gradients(case, tmp_path):
    """Under torch.autocast to bf16 over float32 weights: FSSDP gathers the active experts
    in bf16 (half the bytes) and reduce-scatters their gradients in float32; EP's
    all-to-alls carry bf16 tokens (half the bytes); gradients stay float32 and close to the
    float32 step's. The expert outputs y [T * k, d] are not kept for the backward: FSSDP's
    gathered SwiGLU experts combine inside their grouped GEMMs, as one process's do; under
    EP, each row's combine weight travels with it and the experts apply it."""
    world, kw = CASES[case]
    out = tmp_path / "amp.pt"
    run_ranks(_amp_worker, world, ParallelConfig(timeout_s=60, **kw), str(out))
    for rank in range(world):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        fp32, bf16 = got[False], got[True]
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
        for name, want in fp32["moved"].items():
            have = bf16["moved"][name]
            if name.endswith(".all_gather"):  # the same experts, in half the bytes
                assert have * 2 == want, (name, have, want)
            elif name.endswith((".dispatch", ".combine")):  # bf16 may route a few otherwise
                assert have < 0.6 * want, (name, have, want)
            elif name.endswith(".reduce_scatter"):
                assert have == want, (name, have, want)
        assert any(n.endswith((".all_gather", ".dispatch")) for n in fp32["moved"])
        assert all(h.dtype == torch.float32 for h in bf16["grads"].values())
        g = torch.cat([t.reshape(-1) for t in fp32["grads"].values()])
        h = torch.cat([bf16["grads"][n].reshape(-1) for n in fp32["grads"]])
        assert ((h - g).norm() / g.norm()).item() < 5e-2  # a few tokens may route otherwise
        kept = got["kept"]  # the experts combine (or weigh) inside: no y [T * k, d] kept
        rows = kept["y_bytes"] // (kept["fused"]["out"].shape[1] * 4)  # T * k
        saved = kept["apart"]["kept"] - kept["fused"]["kept"]
        if case == "fssdp-2":
            assert saved == kept["y_bytes"], kept
        else:  # less the weights of the rows its experts received (float32, at most 2 T k)
            # and the index that picked the weights sent (int64, a view of the dispatch's)
            assert kept["y_bytes"] - (4 * 2 + 8) * rows <= saved < kept["y_bytes"], kept
            torch.testing.assert_close(kept["fused"]["out"], kept["apart"]["out"])
            torch.testing.assert_close(kept["fused"]["dx"], kept["apart"]["dx"])


def test_accumulation_outside_micro_batch_blocks_is_refused():
    """With grad_accum > 1 a backward outside `micro_batch` would sync and average as if
    each were a whole step: it is refused by name, as is a micro-batch index past the step."""
    model = build_model(False, None)
    par = parallelize(model, None, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR),
                      grad_accum=2)
    ids = batches(1)[0]
    out = par.module(ids[:, :-1], labels=ids[:, 1:])
    with pytest.raises(ValueError, match="micro_batch"):
        par.backward(out.loss)
    with pytest.raises(ValueError, match="micro-batch 2 outside"), par.micro_batch(2):
        pass
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        parallelize(model, None, grad_accum=0)


def _global_aux_worker(rank, world, pcfg, out_path):
    mesh = init_distributed(pcfg)
    par = parallelize(build_model("global", None), mesh,
                      optimizer=lambda ps: torch.optim.SGD(ps, lr=LR))
    aux, results = [], {}
    for ids in batches(world):
        local = ids[rank * B:(rank + 1) * B]
        with mesh.guard():
            out = par.module(local[:, :-1], labels=local[:, 1:])
            par.backward(out.loss)
            par.step()
        aux.append(out.aux_loss.item())
    _collect(results, "global", par, aux, world, rank, moved=par.counters.snapshot())
    if rank == 0:
        torch.save(results, out_path)
    mesh.close()


@pytest.mark.parametrize("case", ["dp-2", "fssdp-2"])
def test_global_batch_aux_loss_is_the_whole_batch_loss_split_over_ranks(case, tmp_path):
    """aux_loss_type=global_batch: each rank's loss takes the expert frequencies of every
    rank's tokens (its routers' counts summed by one all-reduce, set up by parallelize) and
    its own probabilities, so the ranks' mean loss and update equal one process's
    micro-batch loss over the whole batch."""
    world, kw = CASES[case]
    out = tmp_path / "global.pt"
    run_ranks(_global_aux_worker, world, ParallelConfig(timeout_s=60, **kw), str(out))
    got = torch.load(out, weights_only=False)["global"]
    model = build_model("global", None)
    model.cfg.moe.router.aux_loss_type = "micro_batch"  # the same routers, one batch
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, ids in enumerate(batches(world)):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ranks = torch.tensor([got["losses"][r][step] for r in range(world)])
        assert ranks.mean().item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
        assert ranks.std() > 0  # each rank's own probabilities
    for name, ref in model.state_dict().items():
        torch.testing.assert_close(got["state"][name].cpu(), ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{case}: {n} {m}")
    assert got["moved"]["layers.0.mlp.router.expert_counts"] == STEPS * 4 * 4  # [E] float32
