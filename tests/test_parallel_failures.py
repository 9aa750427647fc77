"""A dead rank ends the others with a message naming it; byte counters; config errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from moe import ModelConfig, MoEConfig, MoETransformer
from parallel import ParallelConfig, init_distributed, parallelize
from routing import RouterConfig
from tests.dist_utils import free_port, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kill_rank", [1, 0])
def test_killed_rank_ends_the_others_with_its_name(kill_rank):
    world, timeout = 3, 4.0
    port = free_port()
    procs = []
    t0 = time.monotonic()
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KILL_RANK=str(kill_rank),
                   TIMEOUT_S=str(timeout), PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.kill_worker"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - t0
    assert procs[kill_rank].returncode == -9, outs[kill_rank][1][-3000:]
    for r in range(world):
        if r == kill_rank:
            continue
        assert procs[r].returncode != 0, f"rank {r} exited 0 after rank {kill_rank} died"
        err = outs[r][1]
        named = f"rank(s) [{kill_rank}]" in err or (kill_rank == 0 and "rank 0 failed" in err)
        assert named, f"rank {r} did not name rank {kill_rank}:\n{err[-2000:]}"
    # start-up (imports, rendezvous) plus two steps plus the timeout, with slack for CI
    assert elapsed < 60, elapsed


def _bytes_worker(rank, world, out_path):
    mesh = init_distributed(ParallelConfig(mode="fssdp", timeout_s=60))
    torch.manual_seed(0)
    router = RouterConfig(top_k=2, score="sigmoid", expert_bias=True)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=16, moe=MoEConfig(num_experts=8, expert_ffn=24, router=router,
                                                    kernel_backend="torch"))
    model = MoETransformer(cfg)
    with torch.no_grad():
        for layer in model.layers:  # every token picks experts 1 and 5 in every layer
            layer.mlp.router.expert_bias[1] = layer.mlp.router.expert_bias[5] = 10.0
    par = parallelize(model, mesh)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    out = par.module(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    par.after_backward()
    shard = par.model.layers[0].mlp.experts.shard
    moved = par.counters.snapshot()
    grads_zero = [bool((layer.mlp.experts.shard.grad[[0, 2, 3, 4, 6, 7]] == 0).all())
                  for layer in par.model.layers]
    if rank == 0:
        torch.save(dict(moved=moved, shard_len=shard.shape[1], grads_zero=grads_zero), out_path)
    mesh.close()


def test_fssdp_moves_only_the_active_experts(tmp_path):
    world = 2
    out = tmp_path / "bytes.pt"
    run_ranks(_bytes_worker, world, str(out))
    res = torch.load(out)
    expert_bytes = world * res["shard_len"] * 4  # one whole float32 expert
    for layer in ("layers.0.mlp", "layers.1.mlp"):
        assert res["moved"][f"{layer}.all_gather"] == 2 * expert_bytes
        assert res["moved"][f"{layer}.reduce_scatter"] == 2 * expert_bytes
        assert res["moved"][f"{layer}.active_mask"] == 8 * 4  # the [E] int32 mask
    assert all(res["grads_zero"]), "experts no token touched must get zero gradients"


def test_bad_parallel_config():
    with pytest.raises(ValueError, match="ep_size=3 does not divide the world size 4"):
        ParallelConfig(mode="ep", ep_size=3).check(4)
    with pytest.raises(ValueError, match="mode must be"):
        ParallelConfig(mode="tp").check(2)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           if k in os.environ}
    try:
        with pytest.raises(ValueError, match="torchrun"):
            init_distributed(ParallelConfig())
    finally:
        os.environ.update(env)


def _indivisible_worker(rank, world):
    mesh = init_distributed(ParallelConfig(mode="ep", timeout_s=30))
    model = MoETransformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                       n_kv_heads=1, moe=MoEConfig(num_experts=3, expert_ffn=8)))
    try:
        with pytest.raises(ValueError, match="num_experts=3 is not divisible by the EP group"):
            parallelize(model, mesh)
    finally:
        mesh.close()


def test_ep_needs_divisible_experts():
    run_ranks(_indivisible_worker, 2)


def test_torchrun_launch():
    """The same worker under torchrun (its environment, its rendezvous), no rank killed."""
    env = dict(os.environ, KILL_RANK="-1", TIMEOUT_S="30", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "tests.kill_worker"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        assert f"rank {r} step 3 loss" in proc.stdout
