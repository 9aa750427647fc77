"""Step metrics: console progress, metrics.jsonl, wandb, and the expert-load heatmap."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class MetricsLogger:
    """One JSON object per step to run_dir/metrics.jsonl (rank 0), a console line every
    log_every steps, and wandb when configured (WANDB_MODE=offline works without network)."""

    def __init__(self, run_dir: Path, max_steps: int, log_every: int, kind: str = "console",
                 project: str = "moe-framework", run_name: str | None = None,
                 config: dict | None = None, enabled: bool = True):
        self.enabled, self.max_steps, self.log_every = enabled, max_steps, log_every
        self.path = run_dir / "metrics.jsonl"
        self.loads: list[tuple[int, list[list[float]]]] = []
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self.wandb = None
        if enabled and kind == "wandb":
            import wandb

            self.wandb = wandb.init(project=project, name=run_name, config=config,
                                    dir=str(run_dir))
        elif kind not in ("console", "wandb"):
            raise ValueError(f"logger.kind must be console or wandb, got {kind!r}")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self.first_step is None:
            self.first_step = step
        self.loads.append((step, record["expert_load"]))
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if k != "expert_load"}
            for i, layer in enumerate(record["expert_load"]):
                flat[f"expert_load/layer{i}_max"] = max(layer) if layer else 0.0
            self.wandb.log(flat, step=step)
        if step % self.log_every == 0 or step == self.max_steps:
            done = step - self.first_step + 1
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.max_steps - step)
            print(f"step {step:5d}/{self.max_steps}  loss {record['loss']:.4f}  "
                  f"aux {record['aux_loss']:.3f}  z {record['z_loss']:.3f}  "
                  f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
                  f"mfu {record['mfu'] * 100:.2f}%  drop {record['dropped_fraction']:.3f}  "
                  f"k {record.get('experts_per_token', 0):.2f}  "
                  f"maxvio {record.get('load_max_violation', 0):.2f}  "
                  f"eta {eta:5.0f}s", flush=True)
        if "val_loss" in record:
            print(f"step {step:5d}/{self.max_steps}  validation loss {record['val_loss']:.4f}",
                  flush=True)

    def heatmap(self, path: Path) -> None:
        """PNG: expert load share per layer (rows: layer x expert) over training steps."""
        if not self.enabled or not self.loads:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self.loads]
        grid = torch.tensor([[v for layer in load for v in layer] for _, load in self.loads]).T
        n_layers = len(self.loads[0][1])
        n_exp = grid.shape[0] // max(n_layers, 1)
        fig, ax = plt.subplots(figsize=(10, 1 + 0.25 * grid.shape[0]))
        im = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, grid.shape[0], 0))
        ax.set_yticks([i * n_exp + n_exp / 2 for i in range(n_layers)],
                      [f"layer {i}" for i in range(n_layers)])
        for i in range(1, n_layers):
            ax.axhline(i * n_exp, color="white", lw=0.8)
        ax.set_xlabel("step")
        ax.set_title("expert load (share of routed slots), one row per expert")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
