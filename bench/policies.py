"""Expert-cache policies and the cross-layer prefetcher on a trained model's real routing:
decode hit rate, bytes moved per token and prefetch precision / recall, for every cache policy
with and without prefetch, under budgets that hold 25% and 50% of the experts.

    make demo                                   # trains and exports runs/demo/hf
    python -m bench.policies --model runs/demo/hf

Random weights route tokens with no locality to exploit; a trained model's routing has it,
which is what the policies and the predictor are for. These counts do not depend on the
device (the same tokens route the same way on a GPU), so they run on the CPU. The prompts are
held-out text: this repository's own Python files, which the demo model did not train on.
Each prompt is prefilled and then decoded greedily for --new-tokens tokens; the cache stays
warm from one prompt to the next, as in a server. Counts are of the decode steps only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from bench.common import (
    Stopped,
    append_results,
    command_line,
    markdown_table,
    results_block,
    stop_on_sigterm,
)
from serve.cache import CacheStats, Key
from serve.config import CACHE_POLICIES, ServeConfig
from serve.generate import DecodeBatch
from serve.replay import fewest_misses, flat, rates
from serve.runtime import OffloadedModel, PrefetchStats, memory_plan
from serve.store import WeightStore
from serve.text import TextCodec
from serve.trace import accesses, read_trace

ROOT = Path(__file__).resolve().parents[1]


def held_out_prompts(codec: TextCodec, n: int, tokens: int) -> list[list[int]]:
    """n prompts of `tokens` ids each: the openings of this repository's Python files (sorted
    by path, every file with enough text), which the demo model never saw."""
    prompts = []
    for path in sorted(ROOT.glob("*/*.py")):
        ids = codec.encode(path.read_text())
        if len(ids) >= tokens:
            prompts.append(ids[:tokens])
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} files give {tokens}-token prompts")
    return prompts


def decode_counts(model: OffloadedModel, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy decode of each prompt in turn on one warm cache -> the counters of the decode
    steps only, summed over the prompts."""
    total: dict[str, int] = {}
    decoder = DecodeBatch(model, capacity=1, reuse_prefix=False)  # prompts read whole
    model.reset_stats()
    for ids in prompts:
        (row,) = decoder.add([ids], [new_tokens + 1])
        while row.pending:  # prefill, then the first token
            decoder.step()
        before = model.counters()
        while not row.done:
            decoder.step()
        after = model.counters()
        for k, v in after.items():
            total[k] = total.get(k, 0) + v - before[k]
    return total


def _rates(c: dict) -> tuple[float, float, float]:
    """Summed counters -> (hit rate, prefetch precision, prefetch recall)."""
    cache = CacheStats(**{f.name: c[f.name] for f in fields(CacheStats)})
    pf = PrefetchStats(**{f.name: c[f.name] for f in fields(PrefetchStats)})
    return cache.hit_rate, pf.precision, pf.recall


def _counts(run: ServeConfig, store: WeightStore, prompts: list[list[int]], new_tokens: int,
            prefetch: str, bar: float = 0.0, trace: list | None = None) -> dict:
    """decode_counts of a fresh runtime of `run` with this prefetch setting, and its slots;
    trace: gets the run's expert accesses, each marked whether a decode step made it."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServeConfig(**{**run.__dict__, "prefetch": prefetch, "prefetch_min_weight": bar,
                             "trace_experts": None if trace is None else f"{tmp}/trace"})
        model = OffloadedModel(cfg, store=store)
        out = dict(decode_counts(model, prompts, new_tokens), n_slots=model.n_slots,
                   expert_bytes=model.store.expert_nbytes)
        if trace is not None:
            model.trace.close()
            trace.extend(flat(accesses(read_trace(f"{tmp}/trace")[1])))
    return out


def _floor_row(f: float, slots: int, total: int, quant: str, run: dict,
                trace: list[tuple[Key, bool]], n_tok: int) -> list[str]:
    """The table's row of the offline optimum for run's slots and access sequence."""
    asked = sum(counted for _, counted in trace)
    if asked != run["hits"] + run["misses"]:
        raise RuntimeError(f"the trace has {asked} decode accesses, the cache counted "
                           f"{run['hits'] + run['misses']}")
    r = rates(fewest_misses(trace, run["n_slots"]), asked, run["expert_bytes"], n_tok)
    return [f"{slots}/{total} ({f:.0%})", quant, str(run["n_slots"]),
            "fewest possible (offline)", "-", f"- / {r['hit_rate']:.2f}",
            f"- / {r['bytes_per_token'] / 2**10:.1f}", "-"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained model directory (make demo: "
                   "runs/demo/hf)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--policies", default=",".join(CACHE_POLICIES))
    p.add_argument("--quants", default="none",
                   help="expert formats (none, int8, int4): packed ones fit more slots in the "
                        "same budget and move fewer bytes each")
    p.add_argument("--min-weights", default="0",
                   help="prefetch_min_weight values for the prefetch rows (0: every top-k "
                        "prediction is copied ahead)")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    bars = [float(x) for x in a.min_weights.split(",") if x]
    bad = [q for q in a.quants.split(",") if q and q not in ("none", "int8", "int4")]
    if bad:
        sys.exit(f"error: --quants takes none, int8 and int4, got {', '.join(bad)}")
    policies = [x for x in a.policies.split(",") if x]
    unknown = set(policies) - set(CACHE_POLICIES)
    if unknown:
        sys.exit(f"error: unknown cache policies {sorted(unknown)}; "
                 f"choose from {', '.join(CACHE_POLICIES)}")
    device, dtype = torch.device("cpu"), torch.float32
    quants = [q for q in a.quants.split(",") if q]
    stores = {q: WeightStore(Path(a.model), dtype, q, host_budget=0) for q in quants}
    store = stores.get("none") or WeightStore(Path(a.model), dtype, "none", host_budget=0)
    codec = TextCodec(a.model)
    prompts = held_out_prompts(codec, a.prompts, a.prompt_len)
    max_context = a.prompt_len + a.new_tokens + 8
    base = ServeConfig(model=a.model, device="cpu", dtype="float32", max_context=max_context)
    fixed, slot, _ = memory_plan(store, base, dtype, 1, max_context)
    total = store.total_experts
    rows, stopped = [], None
    try:
        with stop_on_sigterm():
            for f in (float(x) for x in a.fractions.split(",")):
                slots = max(1, round(f * total))
                for policy, q in ((p, q) for q in quants for p in policies):
                    run = ServeConfig(**{**base.__dict__, "memory_budget": fixed
                                         + slots * slot, "cache_policy": policy, "quant": q})
                    trace: list[tuple[Key, bool]] = []
                    none = _counts(run, stores[q], prompts, a.new_tokens, "none", trace=trace)
                    floor = _floor_row(f, slots, total, q, none, trace,
                                       a.prompts * a.new_tokens)
                    for bar in bars:
                        pf = _counts(run, stores[q], prompts, a.new_tokens, "cross-layer", bar)
                        n_tok = a.prompts * a.new_tokens
                        (hit, prec, rec), (hit0, _, _) = _rates(pf), _rates(none)
                        rows.append([f"{slots}/{total} ({f:.0%})", q, str(pf["n_slots"]),
                                     policy, f"{bar:g}", f"{hit:.2f} / {hit0:.2f}",
                                     f"{pf['bytes_to_device'] / n_tok / 2**10:.1f} / "
                                     f"{none['bytes_to_device'] / n_tok / 2**10:.1f}",
                                     f"{prec:.2f} / {rec:.2f}"])
                        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
                    if policy == policies[-1]:  # the answers, so the accesses, are the same
                        rows.append(floor)
    except Stopped:
        stopped = "stopped by SIGTERM (timeout); the rows are those measured before it"
    m = store.cfg
    body = (f"Model: `{a.model}` ({m.n_layers} layers, {m.moe.num_experts} experts top-"
            f"{m.moe.router.top_k}, d={m.d_model}, expert ffn={m.moe.expert_ffn}), float32 on "
            f"the CPU. {a.prompts} held-out prompts of {a.prompt_len} tokens (this "
            f"repository's Python files), {a.new_tokens} greedy tokens each, one warm cache; "
            "counts of the decode steps. pf = cross-layer prefetch of the predicted experts "
            "whose predicted weight reaches 'pf min weight' for some token (0: all top-k)."
            "\n\n"
            + (f"**Partial**: {stopped}.\n\n" if stopped else "")
            + markdown_table(["budget (float32 slots)", "expert format", "slots", "policy",
                              "pf min weight", "hit rate (pf / no pf)",
                              "KiB moved / token (pf / no pf)", "prefetch prec / recall"],
                             rows))
    title = "Cache policies on a trained model's routing (bench/policies.py)"
    command = command_line("bench.policies", argv)
    print(results_block(title, command, device, body))
    append_results(a.out, title, command, device, body)
    if stopped:
        raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
