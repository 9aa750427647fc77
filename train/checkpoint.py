"""Checkpoints through torch.distributed.checkpoint, in the single-process layout, written
atomically: a run killed mid-write leaves the previous checkpoint as `latest`.

DIR/checkpoints/step_00000100/  (DCP files: model, optimizer state, trainer state)
DIR/checkpoints/latest          (the name of the newest complete checkpoint)

Optimizer state is canonical too (one tensor per parameter and moment), DeepSpeed ZeRO's
partitioned dense state included, so a checkpoint resumes on any rank count and mode.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel import Parallelized


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(ckpt_root: Path, step: int, par: Parallelized, extra: dict, model_config: dict,
         keep: int = 0) -> Path:
    """Write step `step` and point `latest` at it once every file is in place; keep > 0:
    then delete all but the newest `keep` checkpoints."""
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    if _is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    state = {"model": par.full_state_dict(), "optim": par.optimizer_state(),
             "trainer": {"step": torch.tensor(step)}}
    with warnings.catch_warnings():  # DCP warns that one process means no process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    # Per-rank state that does not reshard (RNG) sits beside the DCP files.
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.save({"rng": torch.get_rng_state(), "world_size": world, **extra},
               tmp / f"rank{rank}_extra.pt")
    _barrier()
    if _is_main():
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = ckpt_root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, ckpt_root / "latest")
        if keep > 0:
            for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def model_config(path: Path):
    """The ModelConfig a checkpoint was written for."""
    from moe.config import ModelConfig

    return ModelConfig.from_dict(json.loads((path / "model_config.json").read_text()))


def resolve(path: Path) -> Path | None:
    """A step folder, a checkpoints/ folder or a run dir -> the step folder it means (the
    newest for the last two), or None when there is no checkpoint there."""
    for root in (path, path / "checkpoints"):
        if (root / "latest").exists():
            path = latest(root)
            break
    return path if path is not None and (path / "model_config.json").exists() else None


def latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if path.exists() else None


def check_model_config(path: Path, run_config: dict) -> None:
    """Stop with the differing fields when the checkpoint was written for another model."""
    saved = asdict(model_config(path))  # fields added since it was written: their defaults
    diffs = _diff(saved, run_config)
    if diffs:
        raise ValueError(f"checkpoint {path} was written for another model shape: "
                         + "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}"
                                     for k, a, b in diffs[:6]))


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix[:-1], a, b)]


def load(path: Path, par: Parallelized, load_optimizer: bool = True) -> dict:
    """Load model (and optimizer) state from `path` into `par`; returns the trainer state."""
    model_state = {k: torch.empty_like(v) for k, v in par.full_state_dict().items()}
    state = {"model": model_state, "trainer": {"step": torch.tensor(0)}}
    if load_optimizer and par.optimizers:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
        keys = [k[len("optim."):] for k in meta.state_dict_metadata if k.startswith("optim.")]
        state["optim"] = {k: torch.empty(meta.state_dict_metadata["optim." + k].size,
                                         dtype=meta.state_dict_metadata["optim." + k]
                                         .properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    par.load_full_state_dict(state["model"])
    if "optim" in state:
        par.load_optimizer_state(state["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    extra_path = path / f"rank{rank}_extra.pt"
    extra = torch.load(extra_path, weights_only=False) if extra_path.exists() else {}
    if "rng" in extra:
        torch.set_rng_state(extra["rng"])
    return {"step": int(state["trainer"]["step"]), **extra}
