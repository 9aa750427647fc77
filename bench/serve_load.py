"""Serving under load: requests arriving at random (Poisson) times through the server's
`Batcher`, served one at a time, with static batching (a batch starts when the last one has
drained) and with continuous batching (a request joins the running batch at the next step:
its prompt read in the running rows' decode forward, or, "continuous-split", as steps did
before, a chunk a step in a forward of its own beside theirs).
Same model, same expert slots, same arrivals; prompts and answer lengths vary, as a server's
do. Reports throughput, latency and time to first token (mean and p90) side by side.

    python -m bench.serve_load --smoke     # CPU: tiny Mixtral-layout model, random weights
    python -m bench.serve_load             # GPU: Mixtral-8x7B layer shapes, 4 layers

The HTTP layer is left out (it adds the same per-request cost to every mode). On the CPU a
step's cost grows with the distinct experts it touches (each is its own copy and small GEMM),
so batching gains little there; on a GPU a decode step reads weights at memory speed and
costs about the same for 1 or 4 rows, and what batching changes is the bytes moved per token.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import time

import torch

from bench.common import (
    Stopped,
    append_results,
    command_line,
    markdown_table,
    scratch_dir,
    stop_on_sigterm,
)
from bench.serve import SHAPES, bench_model, write_model
from serve.batcher import Batcher, Request
from serve.config import CACHE_POLICIES, ServeConfig
from serve.runtime import memory_plan
from serve.sampling import SamplingConfig
from serve.session import Session
from serve.store import WeightStore

# mode -> (max batch (None: --max-batch), continuous, joint)
MODES = {"sequential": (1, True, True), "static": (None, False, True),
         "continuous-split": (None, True, False), "continuous": (None, True, True)}


def workload(n: int, rate: float, vocab: int, prompt: tuple[int, int], new: tuple[int, int],
             seed: int = 0) -> list[tuple[float, list[int], int]]:
    """n requests -> (arrival s, prompt ids, max new tokens), Poisson arrivals at `rate`/s,
    prompt and answer lengths uniform in the given [lo, hi]."""
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt))]
        jobs.append((t, ids, rng.randint(*new)))
    return jobs


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]


def run_mode(session: Session, max_batch: int, continuous: bool, joint: bool,
             jobs: list[tuple[float, list[int], int]]) -> dict:
    """Submit `jobs` at their arrival times to a Batcher; wait for all -> the figures."""
    batcher = Batcher(session, max_batch, continuous=continuous, joint=joint)
    greedy = SamplingConfig()
    try:
        batcher.run(Request(jobs[0][1], 2, greedy))  # warm-up
        before = session.model.counters()["bytes_to_device"]
        t0 = time.perf_counter()
        reqs = []
        for at, ids, n in jobs:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            reqs.append(batcher.submit(Request(ids, n, greedy)))
        for r in reqs:
            r.done.wait()
            if r.error is not None:
                raise r.error
        moved = session.model.counters()["bytes_to_device"] - before
    finally:
        batcher.close()
    end = max(r.submitted + r.stats["latency_s"] for r in reqs)
    tokens = sum(r.stats["new_tokens"] for r in reqs)
    lat = [r.stats["latency_s"] for r in reqs]
    ttft = [r.stats["ttft_s"] for r in reqs]
    return {"wall_s": end - t0, "tokens": tokens, "tokens_per_s": tokens / (end - t0),
            "latency_mean": statistics.fmean(lat), "latency_p90": p90(lat),
            "ttft_mean": statistics.fmean(ttft), "ttft_p90": p90(ttft),
            "batch_mean": statistics.fmean(r.stats["batch_size"] for r in reqs),
            "mib_per_token": moved / tokens / 2**20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=None,
                   help="arrivals per second (default: 8 on the CPU smoke, 2 on a GPU)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--prompt-len", default="8,48", help="lo,hi prompt tokens")
    p.add_argument("--new-tokens", default="4,48", help="lo,hi answer tokens")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="share of the experts the slots hold")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cache-policy", choices=CACHE_POLICIES, default="lru")
    p.add_argument("--prefetch", choices=["cross-layer", "none"], default="cross-layer")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--shape", choices=SHAPES, default="mixtral",
                   help="layer shapes of the random model")
    p.add_argument("--dir", default=None, help="where the random model is written")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mcfg, family, shape = bench_model(a.shape, a.layers, a.smoke)
    rate = a.rate or (8.0 if device.type == "cpu" else 2.0)
    prompt = tuple(int(x) for x in a.prompt_len.split(","))
    new = tuple(int(x) for x in a.new_tokens.split(","))
    root = scratch_dir(a.dir, "moe-serve-load-")
    print(f"writing a {a.layers}-layer random model to {root}", file=sys.stderr)
    write_model(root, mcfg, family, dtype)
    jobs = workload(a.requests, rate, shape["vocab_size"], prompt, new)
    max_context = prompt[1] + new[1] + 8
    store = WeightStore(root, dtype, host_budget=None if device.type == "cuda" else 0)
    total = store.total_experts
    slots = max(1, round(a.fraction * total))
    rows, stopped = [], None
    try:
        with stop_on_sigterm():
            for mode in modes:
                size, continuous, joint = MODES[mode]
                size = size or a.max_batch
                cfg = ServeConfig(model=str(root), device=device.type, dtype=str(dtype)[6:],
                                  max_context=max_context, max_batch=size,
                                  cache_policy=a.cache_policy, prefetch=a.prefetch)
                fixed, slot, _ = memory_plan(store, cfg, dtype, size, max_context)
                cfg.memory_budget = fixed + slots * slot  # the same slots in every mode
                print(f"{mode}: {a.requests} requests at {rate}/s", file=sys.stderr, flush=True)
                r = run_mode(Session(cfg), size, continuous, joint, jobs)
                rows.append([mode, str(size), f"{r['tokens_per_s']:.1f}",
                             f"{r['latency_mean']:.2f}", f"{r['latency_p90']:.2f}",
                             f"{r['ttft_mean']:.3f}", f"{r['ttft_p90']:.3f}",
                             f"{r['batch_mean']:.2f}", f"{r['mib_per_token']:.2f}",
                             f"{r['wall_s']:.1f}"])
    except Stopped:
        stopped = "stopped by SIGTERM (timeout); the rows are those measured before it"
        print(stopped, file=sys.stderr, flush=True)
    table = markdown_table(["mode", "max batch", "tok/s", "latency mean s", "latency p90 s",
                            "ttft mean s", "ttft p90 s", "mean batch", "MiB moved / token",
                            "wall s"], rows)
    print(table)
    shape_txt = f"{a.shape} ({family} layout): " + ", ".join(
        f"{k}={v}" for k, v in shape.items())
    body = (f"Shapes: {shape_txt}, {a.layers} layers, {dtype}; {a.requests} greedy requests, "
            f"Poisson arrivals at {rate}/s, prompts {prompt[0]}-{prompt[1]} tokens, answers "
            f"{new[0]}-{new[1]} tokens; {slots}/{total} expert slots, cache policy "
            f"{a.cache_policy}, prefetch {a.prefetch}.\n\n"
            + (f"**Partial**: {stopped}.\n\n" if stopped else "") + table)
    append_results(a.out, "Serving under load (bench/serve_load.py)",
                   command_line("bench.serve_load", argv), device, body)
    if stopped:
        raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
