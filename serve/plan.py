"""`moe-serve plan`: what a budget buys before anything is loaded. From a model directory's
config and one expert read, the memory plan the runtime would make (non-expert weights, KV
cache, activations, expert slots), the RAM its experts need, and what decode would move per
token over PCIe: every expert a token routes to in each MoE layer, times the share not
cached (routing taken as uniform, so a trained model's skewed routing does better), over
the host-to-device bandwidth (measured on a GPU, or --pcie-gbps).
"""

from __future__ import annotations

from serve.config import ServeConfig
from serve.runtime import context_of, plan_slots, resolve_device, resolve_dtype
from serve.store import WeightStore, available_ram
from serve.units import format_size

# host-to-device bytes/s assumed without a GPU to measure (PCIe 4.0 x16 in practice)
DEFAULT_PCIE = 25e9


def plan(cfg: ServeConfig, pcie_bytes_per_s: float | None = None) -> dict:
    """The plan for cfg as a dict (see the module docstring); BudgetError when no expert
    slot fits, ModelDirError for a directory that cannot be served."""
    cfg.check()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    store = WeightStore(cfg.model, dtype, cfg.quant, tiers=False)  # reads one expert
    m = store.cfg
    max_context = context_of(cfg, m)
    n, fixed, slot, report = plan_slots(store, cfg, dtype, cfg.max_batch, max_context, device)
    total, k = store.total_experts, m.moe.router.top_k
    cold = k * len(store.moe_layers) * store.expert_nbytes  # a token's experts, none cached
    moved = cold * (1 - n / total) if total else 0
    source = "--pcie-gbps" if pcie_bytes_per_s else "assumed"
    if pcie_bytes_per_s is None and device.type == "cuda":
        from serve.bench import h2d_bandwidth

        pcie_bytes_per_s, source = h2d_bandwidth(device), "measured"
    bw = pcie_bytes_per_s or DEFAULT_PCIE
    return {
        "model": str(cfg.model), "family": store.family, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "quant": store.quant,
        "moe_layers": len(store.moe_layers), "moe_layer_ids": store.moe_layers,
        "n_layers": m.n_layers, "experts": total, "top_k": k,
        "expert_bytes": store.expert_nbytes, "expert_slots": n,
        "fixed_bytes": fixed, "slot_bytes": slot, "max_batch": cfg.max_batch,
        "max_context": max_context, "budget_report": report,
        "host_expert_bytes": total * store.expert_nbytes, "host_ram_available": available_ram(),
        "bytes_per_token_cold": cold, "bytes_per_token_expected": moved,
        "pcie_bytes_per_s": bw, "pcie_source": source,
        "pcie_bound_tokens_per_s": bw / moved if moved else None,
    }


def with_trace(p: dict, path: str, verbose: bool = False) -> dict:
    """The plan p with "trace": the decode hit rate and expert bytes per token each cache
    policy would have replaying the expert trace at path (serve/trace.py) at p's slots and
    at a quarter, half and three quarters of the experts, and the fewest possible there."""
    from serve.replay import sweep
    from serve.trace import accesses, is_decode, read_trace

    head, passes = read_trace(path)
    layers, experts = head["moe_layers"], head["num_experts"]
    if layers != p["moe_layer_ids"] or experts * len(layers) != p["experts"]:
        raise ValueError(f"{path} is the trace of another model ({len(layers)} MoE layers x "
                         f"{experts} experts; {p['model']} has {p['moe_layers']} x "
                         f"{p['experts'] // max(p['moe_layers'], 1)})")
    decode = [q for q in passes if is_decode(q)]
    if not decode:
        raise ValueError(f"{path} holds no decode step (a pass of one token a row)")
    total = p["experts"]
    counts = sorted({p["expert_slots"], *(max(1, round(f * total)) for f in (.25, .5, .75))})
    tokens = sum(q["tokens"] for q in decode)
    rows = sweep(accesses(passes), counts, p["n_layers"], p["expert_bytes"], tokens, verbose)
    return {**p, "trace": {"path": str(path), "passes": len(passes),
                           "decode_tokens": tokens, "rows": rows}}


def format_trace(p: dict) -> str:
    """The replay table of with_trace."""
    t = p["trace"]
    names = list(t["rows"][0]["policies"])
    lines = [f"replaying {t['path']} ({t['passes']} passes, {t['decode_tokens']} decode "
             "tokens): decode hit rate, and MiB of experts moved a decode token",
             "| slots | " + " | ".join(names) + " | fewest possible |",
             "|---|" + "---|" * (len(names) + 1)]
    for r in t["rows"]:
        cells = [f"{r['policies'][n]['hit_rate']:.2f}, "
                 f"{r['policies'][n]['bytes_per_token'] / 2**20:.2f}" for n in names]
        floor = r["fewest"]
        cells.append("(trace too long)" if floor is None else
                     f"{floor['hit_rate']:.2f}, {floor['bytes_per_token'] / 2**20:.2f}")
        mark = " (this budget)" if r["slots"] == p["expert_slots"] else ""
        lines.append(f"| {r['slots']}/{p['experts']}{mark} | " + " | ".join(cells) + " |")
    here = next(r for r in t["rows"] if r["slots"] == p["expert_slots"])
    best = min(names, key=lambda n: here["policies"][n]["misses"])
    lines.append(f"at this budget {best} moves the fewest bytes (--cache-policy {best}, on "
                 "this trace, without prefetch)")
    return "\n".join(lines)


def compare(cfg: ServeConfig, pcie_bytes_per_s: float | None = None) -> list[dict]:
    """The plan for each expert format the checkpoint can be served in (none, int8, int4,
    and mxfp4 / fp8 where it stores them so), one bandwidth for all; a format whose budget
    fits no slot is left out."""
    from dataclasses import replace

    from serve.runtime import BudgetError

    first = plan(replace(cfg, quant="auto"), pcie_bytes_per_s)
    quants = dict.fromkeys([first["quant"], "none", "int8", "int4"])
    out = []
    for q in quants:
        try:
            out.append(first if q == first["quant"] else
                       plan(replace(cfg, quant=q), first["pcie_bytes_per_s"]))
        except BudgetError:
            continue
    return out


def format_comparison(plans: list[dict]) -> str:
    """The plans side by side, a row each."""
    head = "| experts | an expert | slots | MiB / token (cold / cached share) | PCIe bound tok/s |"
    rows = [head, "|---|---|---|---|---|"]
    for p in plans:
        bound = p["pcie_bound_tokens_per_s"]
        rows.append(f"| {p['quant']} | {format_size(p['expert_bytes'])} | "
                    f"{p['expert_slots']}/{p['experts']} | "
                    f"{p['bytes_per_token_cold'] / 2**20:.2f} / "
                    f"{p['bytes_per_token_expected'] / 2**20:.2f} | "
                    + (f"{bound:.2f} |" if bound else "all resident |"))
    p = plans[0]
    return (f"{p['model']} on {p['device']} ({p['dtype']}), PCIe "
            f"{p['pcie_bytes_per_s'] / 1e9:.1f} GB/s ({p['pcie_source']}):\n" + "\n".join(rows))


def format_plan(p: dict) -> str:
    """The plan as lines of text."""
    ram = p["host_expert_bytes"]
    fits = ("fit" if ram <= p["host_ram_available"] else
            "do not fit: the rest is read from the files (the disk tier)")
    bound = (f"{p['pcie_bound_tokens_per_s']:.2f} tokens/s" if p["pcie_bound_tokens_per_s"]
             else "none: every expert is resident")
    return "\n".join([
        f"model: {p['model']}: {p['family']}, {p['moe_layers']} MoE layers x "
        f"{p['experts'] // max(p['moe_layers'], 1)} experts, top-{p['top_k']}; "
        f"{format_size(p['expert_bytes'])} an expert as it crosses (quant {p['quant']})",
        f"device {p['device']}, {p['dtype']}: {p['budget_report']}",
        f"host RAM: the experts take {format_size(ram)}, "
        f"{format_size(p['host_ram_available'])} available: they {fits}",
        f"decode moves per token: {format_size(p['bytes_per_token_cold'])} with nothing "
        f"cached, ~{format_size(p['bytes_per_token_expected'])} with "
        f"{p['expert_slots']}/{p['experts']} cached (uniform routing)",
        f"PCIe bound at {p['pcie_bytes_per_s'] / 1e9:.1f} GB/s ({p['pcie_source']}): {bound}",
    ])
