"""DP, EP, EP+DP and FSSDP on 2 and 4 real gloo processes against one process on the same
global batch: same losses, same parameters after the update, balanced and skewed routing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe import ModelConfig, MoEConfig, MoETransformer
from parallel import ParallelConfig, init_distributed, parallelize
from routing import RouterConfig
from tests.dist_utils import run_ranks

B, S, STEPS, LR = 2, 8, 2, 0.5


def build_model(skewed: bool, capacity: float | None, num_experts: int = 4) -> MoETransformer:
    """Identical on every rank (seeded). skewed: expert 0 is in every token's top-2."""
    torch.manual_seed(0)
    if skewed:
        router = RouterConfig(top_k=2, score="sigmoid", expert_bias=True,
                              capacity_factor=capacity)
    else:
        router = RouterConfig(top_k=2, capacity_factor=capacity)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=16, dense_ffn=48,
                      moe=MoEConfig(num_experts=num_experts, expert_ffn=24, router=router,
                                    kernel_backend="torch"))
    model = MoETransformer(cfg)
    if skewed:
        with torch.no_grad():
            for layer in model.layers:
                layer.mlp.router.expert_bias[0] = 10.0
    return model


def batches(world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 64, (world * B, S + 1), generator=g) for _ in range(STEPS)]


def reference(world: int, skewed: bool, capacity: float | None):
    """One process, the same global batch as `world` micro-batches: losses and final state."""
    model = build_model(skewed, capacity)
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
        all_losses = [None] * world
        dist.all_gather_object(all_losses, losses)
        state = par.full_state_dict()
        if rank == 0:
            results[(skewed, capacity)] = dict(losses=all_losses, state=state, moved=moved)
    if rank == 0:
        torch.save(results, out_path)
    mesh.close()


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
    world, kw = CASES[case]
    out = tmp_path / "result.pt"
    run_ranks(_worker, world, ParallelConfig(timeout_s=60, **kw), SCENARIOS, str(out))
    results = torch.load(out, weights_only=False)
    for skewed, capacity in SCENARIOS:
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
