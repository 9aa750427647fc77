"""`python -m train.export CHECKPOINT OUT_DIR`: a training checkpoint -> a Hugging Face model
directory (config.json, model.safetensors, tokenizer) in the Mixtral, Qwen3-MoE, GLM-4.5
(sigmoid routing), DeepSeek-V3 (latent attention), GPT-OSS or ERNIE-4.5 (softmax routing
with a selection bias) layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe import MoETransformer
from moe.hf_export import EXPORT_FAMILIES, export_hf
from parallel import parallelize
from train import checkpoint


def find_tokenizer(ckpt: Path) -> Path | None:
    for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (folder / "tokenizer.json").exists():
            return folder / "tokenizer.json"
    return None


def export(ckpt: Path, out_dir: Path, family: str | None = None) -> str:
    """Load `ckpt` (a step folder, or a run's checkpoints folder: its latest) and export."""
    resolved = checkpoint.resolve(ckpt)
    if resolved is None:
        raise FileNotFoundError(f"{ckpt} is not a checkpoint (no model_config.json)")
    ckpt = resolved
    cfg = checkpoint.model_config(ckpt)
    par = parallelize(MoETransformer(cfg), None)
    checkpoint.load(ckpt, par, load_optimizer=False)
    return export_hf(cfg, par.full_state_dict(), out_dir, find_tokenizer(ckpt), family=family)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a step_* folder, checkpoints/ or a run dir")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--family", choices=list(EXPORT_FAMILIES), default=None)
    a = p.parse_args(argv)
    try:
        family = export(a.checkpoint, a.out_dir, a.family)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {a.checkpoint} as {family} to {a.out_dir}")


if __name__ == "__main__":
    main()
