"""Where offloaded decode's time goes, from a profile of a few decode steps: how long the
host-to-device link, the device's kernels and the device as a whole were busy per token, and
the host's waits, next to the wall time. bench/serve.py measures decode at batch 1 well
under the PCIe bound with no prefetch (1.28x-1.51x on the H200, 2026-11-30), so the link
stands idle part of each token: this says for how long, and what the host did meanwhile.
With every expert resident it also times decode steps replayed from CUDA graphs
(--cuda-graphs): the host's floor a token without its launches.

    python -m bench.serve_timeline --dir /tmp/mserve    # GPU: Mixtral-8x7B layer shapes
    python -m bench.serve_timeline --smoke              # CPU: host ops only (no device)

The model is bench/serve.py's random one (reused from --dir when its config matches).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import (
    Stopped,
    append_results,
    command_line,
    markdown_table,
    scratch_dir,
    stop_on_sigterm,
)
from bench.serve import bench_model, write_model
from serve.bench import decode_all
from serve.config import ServeConfig
from serve.generate import DecodeBatch
from serve.runtime import OffloadedModel, memory_plan
from serve.store import WeightStore

# host calls that wait for the device (their self time is the host's wait)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
         "cudaMemcpy", "cudaMemcpyAsync")


def busy_ns(spans: list[tuple[int, int]]) -> int:
    """Total length of the union of [start, end) spans (ns)."""
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def device_spans(prof) -> dict[str, list[tuple[int, int]]]:
    """The profile's device activity as [start, end) ns spans: host-to-device copies, other
    copies and fills, kernels."""
    out: dict[str, list[tuple[int, int]]] = {"h2d": [], "other copies": [], "kernels": []}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.start_ns(), e.start_ns() + e.duration_ns())
        name = e.name()
        if name.startswith("Memcpy HtoD"):
            out["h2d"].append(span)
        elif name.startswith(("Memcpy", "Memset")):
            out["other copies"].append(span)
        else:
            out["kernels"].append(span)
    return out


def host_ops(prof, n: int = 8) -> list[tuple[str, float, int]]:
    """The n host ops of most self time: (name, self ms, calls)."""
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)[:n]
    return [(r.key, r.self_cpu_time_total / 1e3, r.count) for r in rows]


def _prefilled(model: OffloadedModel, prompt_len: int, steps: int) -> DecodeBatch:
    """A batch-1 decoder past a random prompt's prefill, `steps` decode steps to go."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=gen).tolist()
    decoder = DecodeBatch(model, capacity=1, reuse_prefix=False)
    seqs = decoder.add([prompt], [steps + 1])
    while any(r.pending for r in seqs):
        decoder.step()
    model.synchronize()
    return decoder


def time_decode(model: OffloadedModel, prompt_len: int, steps: int) -> float:
    """ms a greedy decode step takes without the profiler (whose per-op cost inflates the
    host's share of the profiled rows)."""
    n, wall = decode_all(_prefilled(model, prompt_len, steps))
    return wall * 1e3 / n


def profile_decode(model: OffloadedModel, prompt_len: int, steps: int) -> dict:
    """Prefill a random prompt, then profile `steps` greedy decode steps -> a report."""
    decoder = _prefilled(model, prompt_len, steps)
    model.reset_stats()
    cuda = model.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        n, wall = decode_all(decoder)
    st = model.stats()
    per = 1e3 / n  # ms per token, from a total in ms
    report = {"tokens": n, "ms_per_token": wall * per, "hit_rate": st["expert_hit_rate"],
              "mib_per_token": st["bytes_to_device"] / n / 2**20,
              "prefetch_copied": st["prefetch_copied"],
              "prefetch_withheld": st["prefetch_withheld"],
              "host_ops": host_ops(prof)}
    waits = sum(r.self_cpu_time_total for r in prof.key_averages() if r.key in WAITS) / 1e3
    report["host_wait_ms_per_token"] = waits / n
    if cuda:
        spans = device_spans(prof)
        h2d = busy_ns(spans["h2d"]) / 1e6
        report.update(
            h2d_ms_per_token=h2d / n,
            h2d_gb_per_s=(st["bytes_to_device"] / (h2d / 1e3) / 1e9) if h2d else None,
            kernels_ms_per_token=busy_ns(spans["kernels"]) / 1e6 / n,
            device_busy_ms_per_token=busy_ns([s for v in spans.values() for s in v]) / 1e6 / n,
            h2d_copies_per_token=len(spans["h2d"]) / n,
            kernels_per_token=len(spans["kernels"]) / n)
        report.update(idle_and_fill(report, len(model.store.moe_layers),
                                    model.store.expert_nbytes))
    return report


def idle_and_fill(report: dict, moe_layers: int, expert_nbytes: int) -> dict:
    """The link's idle ms per MoE layer (a token's wall time less its H2D busy time, over
    its MoE layers) and the share of an expert that the link moves in that time at its busy
    rate: the --prefetch-fraction whose copy ahead just fills the gap (None: no copies)."""
    rate = report.get("h2d_gb_per_s")
    if not rate or not moe_layers:
        return {"link_idle_ms_per_layer": None, "fill_fraction": None}
    idle = max(0.0, report["ms_per_token"] - report["h2d_ms_per_token"]) / moe_layers
    return {"link_idle_ms_per_layer": idle,
            "fill_fraction": min(1.0, idle / 1e3 * rate * 1e9 / expert_nbytes)}


def _fmt(v, spec=".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _row(label: str, r: dict) -> list[str]:
    """A row of the timeline table from profile_decode's report r."""
    return [label, f"{r['ms_per_token']:.2f}", _fmt(r.get("unprofiled_ms_per_token")),
            _fmt(r.get("h2d_ms_per_token")),
            _fmt(r.get("h2d_gb_per_s"), ".1f"), _fmt(r.get("kernels_ms_per_token")),
            _fmt(r.get("device_busy_ms_per_token")), f"{r['host_wait_ms_per_token']:.2f}",
            f"{r['mib_per_token']:.1f}", f"{r['hit_rate']:.2f}",
            _fmt(r.get("h2d_copies_per_token"), ".1f"), _fmt(r.get("kernels_per_token"), ".0f"),
            _fmt(r.get("link_idle_ms_per_layer")), _fmt(r.get("fill_fraction"))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--fractions", default="0.25,1.0",
                   help="comma-separated shares of the experts the budget's slots hold (1.0: "
                   "all resident, the floor of compute and host time a token)")
    p.add_argument("--prefetch", default="none,cross-layer",
                   help="comma-separated modes to profile (cross-layer: with its gate)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="leave out the all-resident setting with its decode steps replayed "
                   "from CUDA graphs (--cuda-graphs; on the CPU: the same fixed-shape steps, "
                   "eager)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=12, help="decode steps profiled")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--dir", default=None, help="the random model (reused if it matches)")
    p.add_argument("--out", default="bench/RESULTS.md")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mcfg, family, shape = bench_model("mixtral", a.layers, device.type == "cpu")
    root = scratch_dir(a.dir, "moe-timeline-")
    cfg_file = root / "config.json"
    have = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    if (have.get("num_hidden_layers"), have.get("hidden_size")) != (a.layers, mcfg.d_model):
        print(f"writing a {a.layers}-layer random model to {root}", file=sys.stderr, flush=True)
        write_model(root, mcfg, family, dtype)
    store = WeightStore(root, dtype, "none", pin=device.type == "cuda",
                        host_budget=None if device.type == "cuda" else 0)
    base = ServeConfig(model=str(root), device=device.type, dtype=str(dtype)[6:],
                       max_context=a.prompt_len + a.tokens + 8)
    fixed, slot, _ = memory_plan(store, base, dtype, 1, base.max_context)
    total = store.total_experts
    rows, ops, records = [], [], {}
    runs = [(f, m, False) for f in (float(x) for x in a.fractions.split(",") if x)
            for m in a.prefetch.split(",") if m] + [(1.0, "none", True)] * a.graphs
    stopped = None
    try:
        with stop_on_sigterm():
            for fraction, mode, graphs in runs:
                slots = max(1, round(fraction * total))
                label = f"{slots}/{total}, {mode}" + (", CUDA graphs" if graphs else "")
                cfg = ServeConfig(**{**base.__dict__, "memory_budget": fixed + slots * slot,
                                     "prefetch": mode, "cuda_graphs": graphs})
                model = OffloadedModel(cfg, store=store)
                profile_decode(model, a.prompt_len, 2)  # warm-up: kernels, autotuning, the gate
                r = profile_decode(model, a.prompt_len, a.tokens)
                r["unprofiled_ms_per_token"] = time_decode(model, a.prompt_len, a.tokens)
                del model
                records[label] = r
                rows.append(_row(label, r))
                ops += [[label, name, f"{ms / r['tokens']:.3f}", str(calls)]
                        for name, ms, calls in r["host_ops"]]
                print(f"  {label}: {r['ms_per_token']:.2f} ms/token", file=sys.stderr, flush=True)
    except Stopped:
        stopped = "stopped by SIGTERM (timeout); the rows are those profiled before it"
        print(stopped, file=sys.stderr, flush=True)
    if a.json_out:  # first: what was measured is kept if the table is not written
        Path(a.json_out).write_text(json.dumps(records, indent=1))
    table = markdown_table(
        ["expert slots, prefetch", "ms / token", "ms / token unprofiled", "H2D busy ms / token",
         "H2D GB/s while busy",
         "kernels busy ms / token", "device busy ms / token", "host waits ms / token",
         "MiB moved / token", "hit rate", "H2D copies / token", "kernels / token",
         "link idle ms / MoE layer", "expert share the idle link moves"], rows)
    table += "\n\nThe host's ops of most self time (ms per token, calls over all tokens):\n\n" \
        + markdown_table(["expert slots, prefetch", "op", "self ms / token", "calls"], ops)
    print(table)
    body = (f"Mixtral-8x7B layer shapes{' (smoke: tiny)' if a.smoke else ''}, {a.layers} "
            f"layers, {dtype}, batch 1, prompt "
            f"{a.prompt_len}, {a.tokens} decode steps profiled (torch.profiler) after a "
            "warm-up, then as many timed without it. Busy times are the union of the "
            "device's spans of each kind; host "
            f"waits are the self time of {', '.join(WAITS)}. The link's idle time per MoE "
            "layer at its busy rate moves the last column's share of an expert: the "
            "--prefetch-fraction that fills it.\n\n"
            + (f"**Partial**: {stopped}.\n\n" if stopped else "") + table)
    append_results(a.out, "Offloaded decode timeline (bench/serve_timeline.py)",
                   command_line("bench.serve_timeline", argv), device, body)
    if stopped:
        raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
