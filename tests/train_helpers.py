"""What the `python -m train` tests share: the tiny run's overrides, a run as a
process (one rank, or several under torchrun) and its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.dist_utils import free_port
from tests.forked import run_module

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.dense_ffn=128", "model.moe.num_experts=4",
        "model.moe.expert_ffn=64", "data.vocab_size=512", "data.max_bytes=400000",
        "data.seq_len=64", "data.batch_size=8", "trainer.log_every=5",
        "optim.warmup_steps=5"]
VAL = ["data.val_fraction=0.05", "trainer.eval_every=2", "trainer.eval_batches=3"]
MLA = ["model=tiny_mla", "router=deepseek_v3", "model.moe.router.n_group=2",
       "model.moe.router.topk_group=1"]  # latent attention, a shared expert, groups


def train(run_dir: Path, data_cache: str, *overrides: str, nproc: int = 1, env=None,
          check: bool = True) -> subprocess.CompletedProcess:
    """`python -m train` on the tiny run's overrides: one rank forked from the fork server
    (tests.forked), several under torchrun."""
    args = [*TINY, f"data.cache_dir={data_cache}", f"hydra.run.dir={run_dir}", *overrides]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    if nproc == 1:
        proc = run_module("train", args, cwd=ROOT, env=full_env, timeout=600)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "train", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in records(run_dir)}


def load_and_run(ckpt: str, mesh) -> torch.Tensor:
    from moe import MoETransformer
    from parallel import parallelize
    from train import checkpoint

    cfg = checkpoint.model_config(Path(ckpt))
    model = MoETransformer(cfg)
    par = parallelize(model, mesh)
    checkpoint.load(Path(ckpt), par, load_optimizer=False)
    ids = torch.arange(32).remainder(cfg.vocab_size).view(2, 16)
    with torch.no_grad():
        return par.model(ids).logits
