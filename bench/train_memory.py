"""One training step (forward + backward) of an MoE transformer: the activations it keeps for
backward and its time, for each activation-checkpointing mode (keep all, recompute the routed
experts' SwiGLU activation, recompute each MLP, recompute each block), in float32 and under
bf16 autocast over float32 weights.

    python -m bench.train_memory                  # the small model (configs/model/small.yaml)
    python -m bench.train_memory --smoke          # tiny shapes, CPU

"kept" counts the bytes of every tensor autograd saves outside the recomputed regions (the
same on any device); "peak" is the CUDA allocator's high-water mark above the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from bench.common import (
    append_results,
    command_line,
    device_name,
    markdown_table,
    peak_memory,
    time_fn,
)
from moe import ModelConfig, MoEConfig, MoETransformer
from routing import RouterConfig

MODES = ("none", "moe_act", "mlp", "block")


def build(a, device: torch.device) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=8,
                      n_kv_heads=4, max_seq_len=a.seq, dense_ffn=2 * a.ffn,
                      moe=MoEConfig(num_experts=a.experts, expert_ffn=a.ffn,
                                    router=RouterConfig(top_k=a.top_k)))
    return MoETransformer(cfg).to(device)


R = TypeVar("R")


def kept_bytes(forward: Callable[[], R]) -> tuple[int, R]:
    """forward() -> (bytes of the tensors autograd saved for backward while it ran, its
    result)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return total[0], out


def measure(model: MoETransformer, ids: torch.Tensor, mode: str, amp: bool,
            device: torch.device, smoke: bool) -> dict:
    model.set_activation_checkpointing(mode)

    def step(backward: bool = True):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp \
            else contextlib.nullcontext()
        with ctx:
            out = model(ids[:, :-1], labels=ids[:, 1:])
        if backward:
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        return out

    kept, _ = kept_bytes(lambda: step(backward=False))
    seconds = time_fn(step, device, budget_s=0.5 if smoke else 3.0, warmup=not smoke)
    return dict(kept=kept, seconds=seconds, peak=peak_memory(step, device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--ffn", type=int, default=704, help="each expert's FFN width")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU; times mean little)")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    if a.smoke:
        a.d_model, a.layers, a.experts, a.ffn, a.vocab, a.seq, a.batch = 64, 2, 8, 64, 512, 64, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(a, device)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device)
    rows, base = [], {}
    for amp in (False, True):
        for mode in MODES:
            r = measure(model, ids, mode, amp, device, a.smoke)
            ref = base.setdefault(amp, r)
            rows.append(["bf16 autocast" if amp else "float32", mode,
                         f"{r['kept'] / 2**20:.1f}", f"{r['kept'] / ref['kept']:.2f}",
                         "-" if r["peak"] is None else f"{r['peak']:.2f}",
                         f"{r['seconds'] * 1e3:.1f}", f"{r['seconds'] / ref['seconds']:.2f}"])
            print(f"| {' | '.join(rows[-1])} |", file=sys.stderr, flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    body = (f"One step (forward + backward) of an MoE transformer: d_model={a.d_model}, "
            f"{a.layers} layers of {a.experts} experts (ffn {a.ffn}, top-{a.top_k}), "
            f"vocab {a.vocab}, {a.batch} x {a.seq} tokens, {n_params / 1e6:.1f}M parameters "
            f"(float32), on {device_name(device)}. kept: bytes autograd saves for backward "
            "outside the recomputed regions; peak: allocator high-water mark above the weights "
            "(CUDA only); time: median step."
            + (" Smoke run: tiny shapes, times mean little." if a.smoke else "") + "\n\n"
            + markdown_table(["precision", "recompute", "kept MiB", "x none", "peak GiB",
                              "step ms", "x none"], rows) + "\n")
    print(body)
    append_results(a.out, "Activation memory and step time by recompute mode "
                   "(bench/train_memory.py)", command_line("bench.train_memory", argv), device,
                   body)


if __name__ == "__main__":
    main()
