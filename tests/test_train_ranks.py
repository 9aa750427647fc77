"""`python -m train` on several ranks (torchrun): validation, bf16, multi-node launch, EP /
FSSDP / DeepSpeed runs resumed and their checkpoints reloaded on one rank. Its own module so
that `make test`'s xdist workers run it beside the other multi-rank tests (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import free_port, run_ranks
from tests.train_helpers import (
    MLA,
    ROOT,
    TINY,
    VAL,
    load_and_run,
    losses,
    records,
    train,
)


def _logits_worker(rank, world, ckpt, out_path, mode, dense):
    from parallel import ParallelConfig, init_distributed
    mesh = init_distributed(ParallelConfig(mode=mode, dense=dense, timeout_s=60))
    logits = load_and_run(ckpt, mesh)
    if rank == 0:
        torch.save(logits, out_path)
    mesh.close()


def test_validation_loss_on_held_out_windows(tmp_path, data_cache):
    """trainer.eval_every: the mean loss over held-out windows, the same on 1 rank and split
    over 2, equal to the saved model's loss recomputed on those windows, which the
    training batches never read."""
    from moe import MoETransformer
    from parallel import parallelize
    from train import checkpoint
    from train.data import DataConfig, TokenBatches, prepare

    common = [*VAL, "trainer.max_steps=4", "trainer.ckpt_every=4"]
    proc = train(tmp_path / "one", data_cache, *common)
    assert "validation loss" in proc.stdout
    train(tmp_path / "two", data_cache, *common, "data.batch_size=4", "parallel=fssdp",
          "parallel.timeout_s=60", nproc=2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert ["val_loss" in r for r in one] == [False, True, False, True]
    for x, y in zip(one, two, strict=True):
        assert y.get("val_loss", 0) == pytest.approx(x.get("val_loss", 0), rel=1e-5, abs=1e-6)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        # the expert loads logged are the global batch's, whatever the ranks (a rounding
        # difference may flip a near-tied token or two of the 1024 slots a layer)
        torch.testing.assert_close(torch.tensor(y["expert_load"]),
                                   torch.tensor(x["expert_load"]), rtol=0, atol=5e-3)
        assert y["load_max_violation"] == pytest.approx(x["load_max_violation"], abs=3e-2)

    cfg = DataConfig(cache_dir=data_cache, vocab_size=512, max_bytes=400000, seq_len=64,
                     batch_size=8, val_fraction=0.05)
    batches = TokenBatches(prepare(cfg, log=lambda *a: None), cfg)
    ckpt = tmp_path / "one" / "checkpoints" / "step_00000004"
    model = MoETransformer(checkpoint.model_config(ckpt))
    checkpoint.load(ckpt, parallelize(model, None), load_optimizer=False)
    with torch.no_grad():
        want = sum(model(b[:, :-1], labels=b[:, 1:]).ce_loss.item()
                   for b in map(batches.val_batch, range(3))) / 3
    assert one[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    held = set(batches.val_windows.tolist())
    trained = {int(w) for w in batches._order(0)}
    assert len(held) == round(0.05 * (len(held) + len(trained))) and not held & trained


def test_bf16_mixed_precision_trains_like_float32(tmp_path, data_cache):
    """trainer.mixed_precision=bf16: float32 weights and AdamW state, bf16 compute; losses
    within bf16 rounding of the float32 run's, on one rank and under 2-rank EP, and the
    checkpoint holds float32 weights."""
    from moe import MoETransformer
    from parallel import parallelize
    from train import checkpoint

    common = ["trainer.max_steps=4", "trainer.ckpt_every=4"]
    train(tmp_path / "fp32", data_cache, *common)
    proc = train(tmp_path / "bf16", data_cache, *common, "trainer.mixed_precision=bf16")
    assert "bf16 autocast over float32 weights" in proc.stdout
    train(tmp_path / "ep", data_cache, *common, "trainer.mixed_precision=bf16",
          "data.batch_size=4", "parallel=ep", "parallel.timeout_s=60", nproc=2)
    a, b, c = (losses(tmp_path / r) for r in ("fp32", "bf16", "ep"))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-2), step
        assert c[step] == pytest.approx(b[step], rel=5e-3), step
    assert b != a  # it did compute in bf16
    ckpt = tmp_path / "bf16" / "checkpoints" / "step_00000004"
    par = parallelize(MoETransformer(checkpoint.model_config(ckpt)), None)
    checkpoint.load(ckpt, par, load_optimizer=False)
    state = par.full_state_dict()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    proc = train(tmp_path / "bad", data_cache, "trainer.max_steps=1",
                 "trainer.mixed_precision=bf16", "trainer.dtype=bfloat16", check=False)
    assert proc.returncode != 0 and "leave trainer.dtype=float32" in proc.stderr


def test_multinode_launch_script_on_one_node(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NNODES="1",
               NODE_RANK="0", MASTER_PORT=str(free_port()), NPROC_PER_NODE="2",
               PYTHON=sys.executable)
    args = [*TINY, f"data.cache_dir={data_cache}", "trainer.max_steps=2", "parallel=ep",
            f"hydra.run.dir={run_dir}", *MLA]  # experts split over ranks; attention MLA
    proc = subprocess.run(["bash", "launch/torchrun_multinode.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s), parallel=ep" in proc.stdout
    assert (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("parallel,mode,dense", [("fssdp_fsdp2", "fssdp", "fsdp2"),
                                                 ("ep", "ep", "ddp")])  # deepspeed: below
def test_two_rank_run_resumes_and_its_checkpoint_reloads_on_one_rank(tmp_path, data_cache,
                                                                     parallel, mode, dense):
    """Resumed from its step-2 checkpoint on two ranks, a run continues with the uninterrupted
    run's losses; the uninterrupted run's last checkpoint gives the same logits loaded on two
    ranks (same parallel mode) and on one."""
    common = ["trainer.max_steps=4", "trainer.ckpt_every=2", f"parallel={parallel}",
              "parallel.timeout_s=60"]
    train(tmp_path / "a", data_cache, *common, nproc=2)
    train(tmp_path / "b", data_cache, *common[1:], "trainer.max_steps=2", nproc=2)
    train(tmp_path / "b", data_cache, *common, "trainer.resume=true", nproc=2)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step

    ckpt = str(tmp_path / "a" / "checkpoints" / "step_00000004")
    out = tmp_path / "logits2.pt"
    run_ranks(_logits_worker, 2, ckpt, str(out), mode, dense)
    two_rank = torch.load(out)
    one_rank = load_and_run(ckpt, None)
    torch.testing.assert_close(one_rank, two_rank, rtol=1e-5, atol=1e-5)


def test_deepspeed_run_resumes_on_two_ranks_and_on_one_with_its_optimizer_state(
        tmp_path, data_cache):
    """ZeRO-partitioned dense AdamW state saved on 2 ranks continues on 2 ranks, and on 1 rank
    (same global batch: 2 x 8 rows = 1 x 16), with the uninterrupted run's losses."""
    common = ["trainer.max_steps=4", "trainer.ckpt_every=2", "parallel=fssdp_deepspeed",
              "parallel.timeout_s=60"]
    train(tmp_path / "a", data_cache, *common, nproc=2)
    train(tmp_path / "b", data_cache, *common[1:], "trainer.max_steps=2", nproc=2)
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # the step-2 checkpoint, resumed twice
    train(tmp_path / "b", data_cache, *common, "trainer.resume=true", nproc=2)
    proc = train(tmp_path / "c", data_cache, *common, "trainer.resume=true",
                 "data.batch_size=16")
    assert "optimizer's moments restart" not in proc.stdout + proc.stderr
    a, b, c = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(tmp_path / "c")
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step
        assert c[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step


def test_deepspeed_dense_trains_like_ddp(tmp_path, data_cache):
    """ZeRO-2 for the dense parameters changes where their optimizer state lives, not the
    training: same losses and global grad norms (clipping active) as DDP, with the lr
    schedule applied to DeepSpeed's optimizer and its gradient slices in the global norm."""
    common = ["trainer.max_steps=4", "optim.grad_clip=0.3", "parallel.timeout_s=60"]
    train(tmp_path / "ddp", data_cache, *common, "parallel=fssdp", nproc=2)
    train(tmp_path / "ds", data_cache, *common, "parallel=fssdp_deepspeed", nproc=2)

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(records(tmp_path / "ddp"), records(tmp_path / "ds"), strict=True):
        assert a["grad_norm"] > 0.3  # clipping is active
        for key in ("loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_one_process_says_which_parallel_settings_wait_for_torchrun():
    from parallel import ParallelConfig
    from train.trainer import _one_process_note

    assert _one_process_note(ParallelConfig()) == ""
    assert _one_process_note(ParallelConfig(mode="ep")) == \
        " (one process: parallel=ep takes effect under torchrun)"
    assert "parallel=fssdp and parallel.dense=deepspeed take effect" in \
        _one_process_note(ParallelConfig(mode="fssdp", dense="deepspeed"))
