"""Collect a Hydra sweep's runs into one table and one plot.

    python -m train -m router.top_k=1,2,4 model.moe.num_experts=8,16 ...
    python -m train.sweep_report runs/sweep_<date>      # -> sweep.md, sweep.png there
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def collect(sweep_dir: Path) -> list[dict]:
    """One row per finished run: its overrides, final loss, its last validation loss (None
    without one), median tokens/s, and the mean experts a token went to over the last 10% of
    steps (None for runs that did not log it)."""
    rows = []
    for metrics in sorted(sweep_dir.glob("*/metrics.jsonl"), key=lambda p: p.parent.name):
        run = metrics.parent
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        if not records:
            continue
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_file.exists():
            overrides = [ln[2:].strip() for ln in overrides_file.read_text().splitlines()
                         if ln.startswith("- ")]
        tail = records[-max(1, len(records) // 10):]
        rows.append(dict(run=run.name, setting=" ".join(overrides) or run.name,
                         steps=records[-1]["step"],
                         final_loss=statistics.mean(r["loss"] for r in tail),
                         val_loss=next((r["val_loss"] for r in reversed(records)
                                        if "val_loss" in r), None),
                         tokens_per_s=statistics.median(r["tokens_per_s"] for r in records),
                         experts_per_token=statistics.mean(r["experts_per_token"] for r in tail)
                         if all("experts_per_token" in r for r in tail) else None))
    return rows


def write(rows: list[dict], sweep_dir: Path) -> tuple[Path, Path]:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    table = ["| run | setting | steps | final loss | validation loss | tokens/s | "
             "experts/token |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['setting']} | {r['steps']} | {r['final_loss']:.4f} | "
              f"{num(r['val_loss'], '.4f')} | {r['tokens_per_s']:,.0f} | "
              f"{num(r['experts_per_token'], '.2f')} |" for r in rows]
    md = sweep_dir / "sweep.md"
    md.write_text("\n".join(table) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = any(r["val_loss"] is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(18 if val else 12,
                                                          1.5 + 0.45 * len(rows)))
    labels = [r["setting"] for r in rows]
    axes[0].barh(labels, [r["final_loss"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("final loss (mean of the last 10% of steps)")
    if val:  # runs without a validation loss get no bar
        axes[1].barh(labels, [r["val_loss"] or 0.0 for r in rows], color="tab:orange")
        axes[1].set_xlabel("validation loss (last)")
        axes[1].set_yticks([])
    axes[-1].barh(labels, [r["tokens_per_s"] for r in rows], color="tab:green")
    axes[-1].set_xlabel("tokens / s (median)")
    axes[-1].set_yticks([])
    fig.tight_layout()
    png = sweep_dir / "sweep.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return md, png


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Collect a Hydra sweep into a table and a plot")
    p.add_argument("sweep_dir", type=Path)
    a = p.parse_args(argv)
    if not a.sweep_dir.is_dir():
        sys.exit(f"error: {a.sweep_dir} is not a directory")
    rows = collect(a.sweep_dir)
    if not rows:
        sys.exit(f"error: no run with a metrics.jsonl under {a.sweep_dir}")
    md, png = write(rows, a.sweep_dir)
    print(md.read_text(), end="")
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
