"""`python -m train [overrides]`: the Hydra entry point (also under torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.config import TrainConfig, register

register()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> float:
    from train.trainer import run

    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        losses = run(cfg, run_dir)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return losses[-1] if losses else float("nan")


if __name__ == "__main__":
    main()
