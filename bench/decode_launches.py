"""What the host does for one offloaded decode token: the device kernels it launches per
token, by phase (the step's set-up, attention, routing and the MoE layer's glue, the expert
kernels, the head and sampling), and its waits for the device; then the time a token takes
on the CPU at tiny shapes, where the ops' own work is small and the host's dispatch is most
of it. On a GPU every launch costs the host microseconds, and at batch-1 decode with the
experts resident the host, not the device, sets the pace (bench/RESULTS.md, the second H200
lease's timeline: 1.4 ms of kernels in a 15 ms token). Counted on the CPU, the Triton kernels
under Triton's interpreter; the launch sequence is the one a GPU gets, but for the step's
set-up, whose count here is the host's own ops building the step's indices and RoPE (on CUDA
host work, and two copies to the device are its launches), and one small copy to the device
per expert call (the slot table), which the CPU does not make.

    python -m bench.decode_launches
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

# (method of serve.runtime.OffloadedModel, phase); nested phases are counted apart
PHASES = (("_context", "set-up"), ("_attend", "attention"), ("_moe", "MoE glue"),
          ("_experts", "experts"), ("_head", "head"),
          # the fixed-shape steps (--cuda-graphs): their buffers' copies are the set-up, the
          # forward's own ops (embedding, residual adds) other
          ("_fixed_run", "set-up"), ("_fixed_forward", "other"), ("_moe_resident", "MoE glue"),
          ("_run_experts", "experts"))
COLUMNS = ("set-up", "attention", "MoE glue", "experts", "head")  # then other: the rest
PER_LAYER = ("attention", "MoE glue", "experts")  # reported per MoE layer, the others a token
# the serving code's reads of device values (on CUDA each waits for the device)
READS = ("tolist", "item")


def _model(root: Path, layers: int, backend: str, fraction: float, prefetch: str,
           rows: int = 1, graphs: bool = False):
    """A random Mixtral-like model of tiny shapes (written to root once) served on the CPU
    with `fraction` of its experts resident, for `rows` sequences at once (graphs: with
    --cuda-graphs, whose fixed-shape steps run eagerly on the CPU)."""
    import torch

    from bench.serve import bench_model, write_model
    from serve.config import ServeConfig
    from serve.runtime import OffloadedModel, memory_plan
    from serve.store import WeightStore

    cfg, family, _ = bench_model("mixtral", layers, smoke=True)
    if not (root / "config.json").exists():
        write_model(root, cfg, family, torch.float32)
    store = WeightStore(root, torch.float32, "none")  # in RAM, as a GPU server keeps them
    base = ServeConfig(model=str(root), device="cpu", dtype="float32", max_context=256,
                       kernel_backend=backend, prefetch=prefetch, max_batch=rows,
                       cuda_graphs=graphs)
    fixed, slot, _ = memory_plan(store, base, torch.float32, rows, base.max_context)
    slots = max(1, round(fraction * store.total_experts))
    return OffloadedModel(ServeConfig(**{**base.__dict__,
                                         "memory_budget": fixed + slots * slot}), store=store)


def _decoder(model, tokens: int):
    """A DecodeBatch of model.max_batch rows (prompts of 32, 24, 16 ... tokens: each row
    at its own position) past their prefill, with `tokens` decode steps to go."""
    from serve.generate import DecodeBatch

    rows = model.max_batch
    d = DecodeBatch(model, capacity=rows, reuse_prefix=False)
    d.add([list(range(1, 33 - 8 * r)) for r in range(rows)], [tokens + 1] * rows)
    while any(r.pending for r in d.live):
        d.step()  # the prefill
    return d


def count_token(model, tokens: int = 4) -> tuple[Counter, dict[str, Counter]]:
    """Launches and waits of `tokens` decode steps (after as many warm-up ones), per token
    -> (totals, per phase)."""
    import torch

    from bench.layer_launches import counting
    from serve.bench import decode_all
    from serve.runtime import OffloadedModel

    decode_all(_decoder(model, tokens))
    d = _decoder(model, tokens)
    phases: dict[str, Counter] = {name: Counter() for _, name in PHASES}
    saved = {m: getattr(OffloadedModel, m) for m, _ in PHASES}
    stack: list[Counter] = []

    def wrap(method: str, name: str):
        f = saved[method]

        def counted(self, *a, **k):
            before = Counter(ops)
            stack.append(Counter())  # what nested phases count
            try:
                return f(self, *a, **k)
            finally:
                inner = stack.pop()
                own = Counter(ops)
                own.subtract(before)
                own.subtract(inner)
                phases[name].update(own)
                if stack:
                    stack[-1].update(own + inner)
        return counted

    reads = {m: getattr(torch.Tensor, m) for m in READS}

    def read(method: str):
        f = reads[method]

        def counted(t, *a, **k):
            if os.sep + "serve" + os.sep in sys._getframe(1).f_code.co_filename:
                ops["read"] += 1
            return f(t, *a, **k)
        return counted

    try:
        with counting() as ops:
            for method, name in PHASES:
                setattr(OffloadedModel, method, wrap(method, name))
            for method in READS:
                setattr(torch.Tensor, method, read(method))
            n, _ = decode_all(d)
    finally:
        for method, f in saved.items():
            setattr(OffloadedModel, method, f)
        for method, f in reads.items():
            setattr(torch.Tensor, method, f)
    n *= model.max_batch  # tokens
    total = Counter({k: v / n for k, v in ops.items()})
    per = {name: Counter({k: v / n for k, v in c.items()}) for name, c in phases.items()}
    return total, per


def cpu_ms_per_token(model, tokens: int) -> float:
    """Best of 3 timed runs of `tokens` decode steps -> ms a token."""
    from serve.bench import decode_all

    best = float("inf")
    for _ in range(4):  # the first warms up
        d = _decoder(model, tokens)
        t = time.perf_counter()
        n, _ = decode_all(d)
        best = min(best, (time.perf_counter() - t) / (n * model.max_batch))
    return best * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="this commit", help="names the code measured")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4, help="decode steps counted")
    p.add_argument("--timed-tokens", type=int, default=64,
                   help="decode steps timed on the torch backend (0: no timing)")
    p.add_argument("--dir", default=None, help="the tiny random model (reused)")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    from bench.layer_launches import use_interpreter

    use_interpreter("bench.decode_launches")
    import torch

    from bench.common import append_results, command_line, markdown_table, scratch_dir

    root = scratch_dir(a.dir, "moe-decode-launches-")
    cases = (("all experts resident", 1.0, "none", 1, False),
             ("a quarter resident", 0.25, "none", 1, False),
             ("a quarter resident, cross-layer prefetch", 0.25, "cross-layer", 1, False),
             ("4 rows at 4 positions, all resident (a step / 4)", 1.0, "none", 4, False),
             ("all experts resident, fixed steps (--cuda-graphs: on a GPU one graph's "
              "kernels)", 1.0, "none", 1, True))
    rows = []
    for label, fraction, prefetch, batch, graphs in cases:
        total, per = count_token(_model(root, a.layers, "triton", fraction, prefetch, batch,
                                        graphs), a.tokens)
        ms = (cpu_ms_per_token(_model(root, a.layers, "torch", fraction, prefetch, batch,
                                      graphs), a.timed_tokens) if a.timed_tokens else None)
        launches = {name: c["torch"] + c["triton"] for name, c in per.items()}
        shown = sum(launches[name] for name in COLUMNS)
        rows.append([a.label, label, f"{total['torch'] + total['triton']:.0f}",
                     f"{total['triton']:.0f}", f"{total['wait']:.0f}", f"{total['read']:.3g}"]
                    + [f"{launches[name] / (a.layers if name in PER_LAYER else 1):.1f}"
                       for name in COLUMNS]
                    + [f"{total['torch'] + total['triton'] - shown:.1f}",
                       f"{ms:.2f}" if ms is not None else "n/a"])
        print(f"| {' | '.join(rows[-1])} |", file=sys.stderr, flush=True)
    body = (f"Greedy decode (batch 1, and 4 rows of different lengths: masked attention) of "
            f"a random {a.layers}-layer Mixtral-like model at tiny "
            "shapes (d 64, 8 experts top-2) on the CPU, after warm-up steps: device kernels "
            "the host launches per token (torch ops that run a kernel + Triton kernels, "
            "Triton backend), per phase (attention, MoE glue and experts per MoE layer; "
            "the MoE glue is routing, the cache's work and the output's assembly; other: the "
            "embedding, residual adds, sampling), ops that "
            "wait for the device (a read back of data: bool indexing, nonzero ...), the "
            "serving code's reads of device values (tolist / item: one a MoE layer, its "
            "routing, and one a token, its sample; a fixed step reads its sample "
            "only), and ms a token on the CPU (torch "
            f"backend, best of 3 runs of {a.timed_tokens} tokens; the host's dispatch, "
            "mostly).\n\n" + markdown_table(
                ["code", "case", "launches / token", "Triton", "host waits", "reads / token",
                 "set-up / token", "attention / layer", "MoE glue / layer",
                 "experts / layer", "head / token", "other / token", "CPU ms / token"],
                rows) + "\n")
    print(body)
    append_results(a.out, "Launches per offloaded decode token (bench/decode_launches.py)",
                   command_line("bench.decode_launches", argv), torch.device("cpu"), body)


if __name__ == "__main__":
    main()
