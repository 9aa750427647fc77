"""EP vs FSSDP (Hecate) on gloo ranks, balanced and skewed routing, plus a cost model.

    python -m bench.parallel                 # 4 ranks on this machine, appends to RESULTS.md

Measures step time, bytes and seconds per collective, and the slowest rank's share of the
expert work; fits a cost model (collective latency + bytes / bandwidth, expert FLOPs / rate
plus a fixed rest) to those runs, prints its error on them, then projects both strategies to
8-256 GPUs at NVLink and InfiniBand bandwidths with the GPU rate our kernels reached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench.common import command_line, markdown_table, results_block

D, F, E, K, LAYERS, B, S, VOCAB = 256, 512, 8, 2, 2, 4, 128, 1024


def build_model(skewed: bool):
    from moe import ModelConfig, MoEConfig, MoETransformer
    from routing import RouterConfig

    torch.manual_seed(0)
    router = (RouterConfig(top_k=K, score="sigmoid", expert_bias=True) if skewed
              else RouterConfig(top_k=K))
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=4, n_kv_heads=4,
                      max_seq_len=S, dense_ffn=F,
                      moe=MoEConfig(num_experts=E, expert_ffn=F, router=router,
                                    kernel_backend="torch"))
    model = MoETransformer(cfg)
    if skewed:  # expert 0 is in every token's top-2: half of all routed slots
        with torch.no_grad():
            for layer in model.layers:
                layer.mlp.router.expert_bias[0] = 10.0
    return model


def _worker(rank, world, mode, skewed, steps, out_path):
    from parallel import ParallelConfig, init_distributed, parallelize

    mesh = init_distributed(ParallelConfig(mode=mode, timeout_s=300))
    par = parallelize(build_model(skewed), mesh, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    g = torch.Generator().manual_seed(100 + rank)
    records = []
    for step in range(steps + 1):  # the first step warms up
        ids = torch.randint(0, VOCAB, (B, S + 1), generator=g)
        par.counters.reset()
        dist.barrier()
        t0 = time.perf_counter()
        out = par.module(ids[:, :-1], labels=ids[:, 1:])
        par.backward(out.loss)
        par.step()
        elapsed = time.perf_counter() - t0
        if step:
            c = par.counters
            records.append(dict(time=elapsed, bytes=dict(c.bytes), seconds=dict(c.seconds),
                                rows=c.expert_rows))
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        torch.save(gathered, out_path)
    mesh.close()


def _collective(name: str) -> str:
    """layers.0.mlp.dispatch.bwd -> dispatch; ...all_gather -> all_gather."""
    last = name.split(".")[-1]
    if last == "bwd":
        return name.split(".")[-2] + " (bwd)"
    return last


@dataclass
class Run:
    mode: str
    skewed: bool
    step_s: float  # median over steps of the slowest rank
    bytes: dict  # collective -> bytes per step, mean over ranks
    comm_s: list  # per rank, seconds in collectives per step (median)
    rows: list  # per rank, expert rows per step
    samples: list  # (collective, bytes, seconds) for the latency/bandwidth fit
    rank_bytes: list  # per rank, bytes per step over all collectives
    rank_calls: list  # per rank, collective calls per step

    @property
    def slowest_share(self) -> float:
        return max(self.rows) / max(sum(self.rows), 1)


def measure(world: int, mode: str, skewed: bool, steps: int) -> Run:
    from tests.dist_utils import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.pt")
        run_ranks(_worker, world, mode, skewed, steps, path)
        per_rank = torch.load(path)
    step_s = statistics.median(max(r[i]["time"] for r in per_rank) for i in range(steps))
    totals: dict[str, float] = {}
    samples = []
    for recs in per_rank:
        for rec in recs:
            for name, nb in rec["bytes"].items():
                key = _collective(name)
                totals[key] = totals.get(key, 0) + nb / (world * steps)
                samples.append((key, nb, rec["seconds"].get(name, 0.0)))
    comm_s = [statistics.median(sum(rec["seconds"].values()) for rec in recs) for recs in per_rank]
    rows = [statistics.median(rec["rows"] for rec in recs) for recs in per_rank]
    rank_bytes = [sum(sum(rec["bytes"].values()) for rec in recs) / steps for recs in per_rank]
    rank_calls = [sum(len(rec["bytes"]) for rec in recs) / steps for recs in per_rank]
    return Run(mode, skewed, step_s, totals, comm_s, rows, samples, rank_bytes, rank_calls)


def fit_line(xs, ys):
    """Least squares y = a + b x -> (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


@dataclass
class CostModel:
    """step = rest + expert FLOPs of the busiest rank / rate + its collectives' (calls x
    latency + bytes / bandwidth). No overlap of communication and compute is assumed."""

    latency_s: float
    bandwidth: float  # bytes / s
    rate: float  # expert FLOP / s
    rest_s: float = 0.0

    def busiest(self, r: Run) -> float:
        """Modelled step seconds of the rank that finishes last."""
        return max(self.rest_s + 18.0 * rows * D * F / self.rate + calls * self.latency_s
                   + nbytes / self.bandwidth
                   for rows, calls, nbytes in zip(r.rows, r.rank_calls, r.rank_bytes,
                                                  strict=True))


def expert_rate(rows: int = 2048) -> float:
    """FLOP/s of the expert MLP (fwd+bwd, torch backend, one thread) on this CPU."""
    from kernels import sort_by_expert
    from moe.experts import Experts

    torch.set_num_threads(1)
    experts = Experts(E, D, F, "swiglu", "torch")
    x = torch.randn(rows, D, requires_grad=True)
    d = sort_by_expert(torch.randint(0, E, (rows, 1)), E)
    experts(x, d).sum().backward()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        experts(x, d).sum().backward()
    return 18.0 * rows * D * F * reps / (time.perf_counter() - t0)


def calibrate(runs: list[Run]) -> CostModel:
    """Latency and bandwidth from every collective call; the expert rate measured apart; the
    rest of the step (attention, dense layers, optimizer, DDP) as the median residual."""
    samples = [(b, s) for r in runs for (_, b, s) in r.samples if b > 0]
    latency, inv_bw = fit_line([b for b, _ in samples], [s for _, s in samples])
    model = CostModel(max(latency, 0.0), 1.0 / max(inv_bw, 1e-15), expert_rate())
    model.rest_s = max(0.0, statistics.median(r.step_s - model.busiest(r) for r in runs))
    return model


# --- projection to GPU clusters ---------------------------------------------------------

@dataclass
class Layer:
    name: str
    d: int
    f: int
    e: int
    k: int
    tokens_per_gpu: int
    bytes_per_el: int = 2  # bf16


GPU_RATE = 418e12  # ours, Mixtral shape, H200 (bench/RESULTS.md)
NVLINK_BW, IB_BW, NVLINK_DOMAIN = 450e9, 50e9, 8  # bytes/s per GPU each way; GPUs per node


def project(layer: Layer, W: int, hot: float, mode: str) -> float:
    """Seconds per layer per step (fwd+bwd) on W GPUs, 8 per NVLink node, InfiniBand between
    nodes; hot: share of all slots taken by the busiest expert (1/E when balanced)."""
    b = layer.bytes_per_el
    slots = layer.tokens_per_gpu * layer.k  # routed rows per GPU
    flops_row = 18.0 * layer.d * layer.f  # fwd+bwd, SwiGLU (3 matrices)
    remote = (W - 1) / W

    def wire(nbytes):
        inter = max(0, W - NVLINK_DOMAIN) / W  # share of peers in other nodes
        return nbytes * (1 - inter) / NVLINK_BW + nbytes * inter / IB_BW

    if mode == "ep":
        ep = min(W, layer.e)
        per_gpu = layer.e // ep
        # the hot expert's GPU: the hot expert plus its other experts' fair share
        rows = (hot + (1 - hot) * (per_gpu - 1) / max(layer.e - 1, 1)) * slots * ep
        a2a = 4 * rows * layer.d * b * remote  # dispatch + combine, fwd and bwd
        replicas = W // ep
        p_bytes = per_gpu * 3 * layer.d * layer.f * b
        allreduce = 2 * (replicas - 1) / replicas * p_bytes if replicas > 1 else 0.0
        return rows * flops_row / GPU_RATE + wire(a2a) + wire(allreduce)
    # FSSDP: tokens stay, every GPU computes its own slots; the active experts (all of them at
    # these token counts) are gathered in fwd and their gradients reduce-scattered in bwd.
    active = min(layer.e, slots * W)
    p_bytes = active * 3 * layer.d * layer.f * b
    return slots * flops_row / GPU_RATE + wire(2 * remote * p_bytes)


def projection_table() -> str:
    layers = [Layer("Mixtral-8x7B", 4096, 14336, 8, 2, 8192),
              Layer("OLMoE", 2048, 1024, 64, 8, 8192),
              Layer("DeepSeek-V3", 7168, 2048, 256, 8, 8192)]
    gpus = (8, 16, 32, 64, 128, 256)
    rows = []
    for layer in layers:
        for routing, hot in (("balanced", 1.0 / layer.e), ("hot expert 4x fair", 4.0 / layer.e)):
            cells = []
            for W in gpus:
                ep, fs = project(layer, W, hot, "ep"), project(layer, W, hot, "fssdp")
                cells.append(f"{ep * 1e3:.0f} / {fs * 1e3:.0f}")
            rows.append([layer.name, routing] + cells)
    return markdown_table(["layer (8k tokens/GPU)", "routing"] + [f"{w} GPUs" for w in gpus],
                          rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    runs = []
    for mode in ("ep", "fssdp"):
        for skewed in (False, True):
            r = measure(a.ranks, mode, skewed, a.steps)
            runs.append(r)
            print(f"{mode} skewed={skewed}: step {r.step_s * 1e3:.1f} ms, slowest share "
                  f"{r.slowest_share:.2f}, bytes {sum(r.bytes.values()) / 1e6:.2f} MB", flush=True)
    model = calibrate(runs)
    rows = []
    for r in runs:
        pred = model.busiest(r)
        coll = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(r.bytes.items()))
        rows.append([r.mode, "skewed" if r.skewed else "balanced", f"{r.step_s * 1e3:.1f}",
                     f"{max(r.comm_s) * 1e3:.1f}", f"{r.slowest_share:.2f}",
                     f"{sum(r.bytes.values()) / 1e6:.2f}", coll,
                     f"{pred * 1e3:.1f} ({(pred / r.step_s - 1) * 100:+.0f}%)"])
    measured = markdown_table(
        ["mode", "routing", "step ms", "max comm ms", "slowest rank share", "MB / rank / step",
         "MB per collective (rank mean)", "model ms (error)"], rows)
    fit = (f"Fit on these runs: collective latency {model.latency_s * 1e6:.0f} us, gloo "
           f"bandwidth {model.bandwidth / 1e9:.2f} GB/s, expert rate {model.rate / 1e9:.1f} "
           f"GFLOP/s, rest of the step {model.rest_s * 1e3:.1f} ms.")
    proj = ("Projection with the same model, GPU constants in place of the fitted ones (ms per "
            "MoE layer per step, fwd+bwd, EP / FSSDP; bf16; expert GEMMs at "
            f"{GPU_RATE / 1e12:.0f} TFLOP/s, our H200 Mixtral figure; 8 GPUs per node on "
            f"NVLink at {NVLINK_BW / 1e9:.0f} GB/s, InfiniBand NDR at {IB_BW / 1e9:.0f} GB/s "
            "between nodes; EP degree min(GPUs, E), expert replicas all-reduced; FSSDP gathers "
            "every active expert; no overlap of communication and compute):\n\n"
            + projection_table())
    body = (f"{a.ranks} gloo ranks, one CPU thread each; model d={D}, ffn={F}, E={E}, k={K}, "
            f"{LAYERS} MoE layers, {B}x{S} tokens per rank, float32; skewed: expert 0 in every "
            "token's top-2 (half of all slots). 'slowest rank share' = the busiest rank's "
            f"expert rows over all ranks' (ideal {1 / a.ranks:.2f}).\n\n" + measured + "\n\n"
            + fit + "\n\n" + proj)
    command = command_line("bench.parallel", argv)
    block = results_block("EP vs FSSDP (bench/parallel.py)", command.strip(),
                          torch.device("cpu"), body)
    print(block)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(block)


if __name__ == "__main__":
    main()
