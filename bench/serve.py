"""Offloaded decode speed on one GPU: ours (cross-layer prefetch and no prefetch) vs
transformers + accelerate offloading, next to the PCIe bound, for a model with Mixtral-8x7B
layer shapes (fewer layers, random bf16 weights) under budgets that hold 25% and 50% of the
experts.

    python -m bench.serve                 # GPU: Mixtral-8x7B layer shapes, 4 layers
    python -m bench.serve --shape deepseek-v2-lite   # MLA, 64 experts top-6, 2 shared
    python -m bench.serve --shape gpt-oss-20b --quants mxfp4,none   # MXFP4 experts, 32 top-4
    python -m bench.serve --smoke         # CPU: tiny shapes, checks the script end to end

PCIe bound: a cache holding a fraction f of the experts must, with no locality to exploit,
move (1 - f) of the experts each token uses; bound tokens/s = measured pinned host-to-device
bandwidth / those bytes. With --quants int8 / int4, our rows also run packed experts under
the same budget (more slots, fewer bytes each; their bound uses their own f and bytes).
With --batches 1,4 a second table decodes b sequences at once under the same expert slots
(the budget grows by the b rows of KV cache only). A step moves each expert once for all its
rows, but b sequences also need b times the working set of one: when that outgrows the
slots the cache thrashes, so bytes per token can rise as well as fall. The table measures it.
Every number lands in tables appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import (
    Stopped,
    append_results,
    command_line,
    markdown_table,
    scratch_dir,
    stop_on_sigterm,
)
from moe.config import MLAConfig, ModelConfig, MoEConfig
from moe.hf_export import hf_config_json
from moe.hf_fp8 import fp8_quantize
from moe.hf_names import EXPERT_NAMES, GPT_OSS_MXFP4, dense_tensor_names, expert_tensor_names
from moe.model import MoETransformer
from routing.config import RouterConfig
from serve.bench import h2d_bandwidth, measure
from serve.config import CACHE_POLICIES, ServeConfig
from serve.runtime import OffloadedModel, memory_plan
from serve.store import WeightStore

MIXTRAL = dict(vocab_size=32000, d_model=4096, n_heads=32, n_kv_heads=8, expert_ffn=14336,
               num_experts=8, top_k=2, max_seq_len=4096)
SMOKE = dict(vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, expert_ffn=96,
             num_experts=8, top_k=2, max_seq_len=256)
# DeepSeek-V2-Lite's sizes (MLA, 64 experts top-6, 2 shared, a dense first layer), written in
# the DeepSeek-V3 layout (sigmoid routing: the same bytes per expert and per token)
DEEPSEEK_V2_LITE = dict(vocab_size=102400, d_model=2048, n_heads=16, expert_ffn=1408,
                        num_experts=64, top_k=6, max_seq_len=4096, dense_ffn=10944,
                        mla=(None, 512, 128, 64, 128))
DEEPSEEK_SMOKE = dict(vocab_size=256, d_model=64, n_heads=4, expert_ffn=48, num_experts=16,
                      top_k=4, max_seq_len=256, dense_ffn=128, mla=(None, 32, 16, 8, 16))
# GPT-OSS-20B's sizes (sinks, biases, clamped SwiGLU, a 128-token window every other layer),
# experts written as the Hub stores them: MXFP4 (random codes, scales near 2^-8)
GPT_OSS_20B = dict(vocab_size=201088, d_model=2880, n_heads=64, n_kv_heads=8, head_dim=64,
                   expert_ffn=2880, num_experts=32, top_k=4, max_seq_len=4096, window=128)
GPT_OSS_SMOKE = dict(vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                     expert_ffn=64, num_experts=8, top_k=2, max_seq_len=256, window=8)
FP8_BLOCK = (128, 128)  # --fp8: DeepSeek-V3's block (32 x 32 at the smoke shapes)
SHAPES = ("mixtral", "deepseek-v2-lite", "gpt-oss-20b")


def bench_model(shape: str, n_layers: int, smoke: bool) -> tuple[ModelConfig, str, dict]:
    """(config, Hub family it is written in, its size fields) of a benchmark model."""
    if shape == "mixtral":
        s = SMOKE if smoke else MIXTRAL
        cfg = ModelConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], n_layers=n_layers,
                          n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                          max_seq_len=s["max_seq_len"], rope_theta=1e6, norm_eps=1e-5,
                          moe=MoEConfig(num_experts=s["num_experts"], expert_ffn=s["expert_ffn"],
                                        router=RouterConfig(top_k=s["top_k"])))
        return cfg, "mixtral", s
    if shape == "gpt-oss-20b":
        s = GPT_OSS_SMOKE if smoke else GPT_OSS_20B
        cfg = ModelConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], n_layers=n_layers,
                          n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                          head_dim=s["head_dim"], max_seq_len=s["max_seq_len"],
                          rope_theta=150000.0, norm_eps=1e-5, qkv_bias=True, o_bias=True,
                          attn_sinks=True, sliding_window=s["window"],
                          sliding_window_layers=list(range(0, n_layers, 2)),
                          moe=MoEConfig(num_experts=s["num_experts"], expert_ffn=s["expert_ffn"],
                                        expert_type="clamped_swiglu", expert_bias=True,
                                        router=RouterConfig(top_k=s["top_k"], gate_bias=True)))
        return cfg, "gpt_oss", s
    if shape != "deepseek-v2-lite":
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    s = DEEPSEEK_SMOKE if smoke else DEEPSEEK_V2_LITE
    cfg = ModelConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], n_layers=n_layers,
                      n_heads=s["n_heads"], n_kv_heads=s["n_heads"],
                      max_seq_len=s["max_seq_len"], dense_ffn=s["dense_ffn"],
                      first_dense_layers=1, mla=MLAConfig(*s["mla"]),
                      moe=MoEConfig(num_experts=s["num_experts"], expert_ffn=s["expert_ffn"],
                                    num_shared_experts=2,
                                    router=RouterConfig(top_k=s["top_k"], score="sigmoid",
                                                        expert_bias=True)))
    return cfg, "deepseek_v3", s


def write_model(out: Path, cfg: ModelConfig, family: str, dtype: torch.dtype,
                fp8: tuple[int, int] | None = None) -> None:
    """A random directory of cfg in the family's Hub layout: one safetensors shard per layer
    (written one at a time, so memory holds one layer) + index + config.json; fp8: the
    experts as an FP8 block-scaled checkpoint stores them, in blocks of this size."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in MoETransformer(cfg).state_dict().items()}
    gate = EXPERT_NAMES[family][0] + ".weight"
    gen = torch.Generator().manual_seed(0)

    def make(hub: str, shape) -> torch.Tensor:
        if hub.endswith("_blocks"):  # any E2M1 codes
            return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        if hub.endswith("_scales"):  # 2^-9 .. 2^-7: values up to ~0.05, like std 0.02
            return torch.randint(118, 121, shape, generator=gen, dtype=torch.uint8)
        if "norm" in hub:
            return torch.ones(shape, dtype=dtype)
        if hub.endswith(("bias", "e_score_correction_bias")):
            return torch.zeros(shape, dtype=dtype)
        std = 0.5 if hub.endswith(gate) else 0.02  # decisive routing
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    parts: dict[str, list[tuple[str, tuple]]] = {}  # shard -> (hub name, shape)
    for ours, hubs in dense_tensor_names(cfg, family).items():
        shape = shapes[ours]
        for hub in hubs:  # fused tensors (gate; up) split evenly by rows
            key = hub.split(".")[2] if hub.startswith("model.layers.") else "top"
            parts.setdefault(key, []).append((hub, (shape[0] // len(hubs), *shape[1:])))
    F, d, E = cfg.moe.expert_ffn, cfg.d_model, cfg.moe.num_experts
    for i in range(n_layers := cfg.n_layers):
        if cfg.is_moe_layer(i) and family == "gpt_oss":  # stacked MXFP4 experts and biases
            base = f"model.layers.{i}.mlp.experts."
            for name, rows, cols in (("gate_up_proj", 2 * F, d), ("down_proj", d, F)):
                parts[str(i)] += [(f"{base}{name}_blocks", (E, rows, cols // 32, 16)),
                                  (f"{base}{name}_scales", (E, rows, cols // 32)),
                                  (f"{base}{name}_bias", (E, rows))]
        elif cfg.is_moe_layer(i):
            for e in range(cfg.moe.num_experts):
                g, u, dn = expert_tensor_names(family, i, e)
                parts[str(i)] += [(g, (F, d)), (u, (F, d)), (dn, (d, F))]
    experts = {n for i in range(n_layers) if cfg.is_moe_layer(i) and family != "gpt_oss"
               for e in range(E) for n in expert_tensor_names(family, i, e)}
    weight_map, total = {}, 0
    for key, names in parts.items():
        fname = f"model-{'top' if key == 'top' else 'layer' + key}.safetensors"
        tensors = {hub: make(hub, shape) for hub, shape in names}
        for hub in [h for h in tensors if fp8 and h in experts]:
            tensors[hub], tensors[hub + "_scale_inv"] = fp8_quantize(tensors[hub], fp8)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.nbytes for t in tensors.values())
        if key != "top":
            print(f"  wrote layer {int(key) + 1}/{n_layers}", file=sys.stderr, flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf_cfg = hf_config_json(cfg, family)
    hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    if family == "gpt_oss":
        hf_cfg["quantization_config"] = GPT_OSS_MXFP4
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                         "activation_scheme": "dynamic",
                                         "weight_block_size": list(fp8)}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))


def hf_decode_tokens_per_s(model_dir: Path, budget: int, prompt_len: int, new_tokens: int,
                           device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """transformers' generate with accelerate offloading what max_memory does not hold."""
    import transformers

    extra = {}
    if "quantization_config" in json.loads((model_dir / "config.json").read_text()):
        # MXFP4: its kernels come from the Hub, which an offline machine lacks
        extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    if device.type == "cuda":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map="auto",
            max_memory={0: budget, "cpu": 400 * 2**30}, **extra)
        label = "transformers + accelerate offload"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                                  **extra)
        label = "transformers (CPU, no offload: smoke only)"
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len)).to(device)

    def run(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)  # warm-up
    t1, tn = run(1), run(new_tokens)
    for _ in range(3 if device.type == "cpu" else 0):  # a shared CPU is noisy: the best of 4
        t1, tn = min(t1, run(1)), min(tn, run(new_tokens))
    if tn <= t1:  # too few tokens to tell decode from prefill
        raise RuntimeError(f"{new_tokens} tokens took no longer than 1 ({tn:.3f} s vs "
                           f"{t1:.3f} s); raise --new-tokens")
    return (new_tokens - 1) / (tn - t1), label


def _measure_ours(base: ServeConfig, budget: int, quant: str, store: WeightStore,
                  prefetch: str, a, batch: int = 1, **over) -> dict:
    """One warmed-up bench.measure of our runtime under `budget`, `batch` sequences at once
    (over: other ServeConfig fields, e.g. prefetch_min_weight) -> its report."""
    cfg = ServeConfig(**{**base.__dict__, "memory_budget": budget, "prefetch": prefetch,
                         "quant": quant, "max_batch": batch, **over})
    model = OffloadedModel(cfg, store=store)
    # warm-up at the timed run's lengths: what is paid once per shape (kernel builds, GEMM
    # picks, a library's plans) falls here, not on whichever setting a run times first
    measure(model, a.prompt_len, a.new_tokens, batch)
    report = measure(model, a.prompt_len, a.new_tokens, batch)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def _measure_variant(base: ServeConfig, budget: int, quant: str, store: WeightStore, a,
                     **over) -> dict:
    """_measure_ours with cross-layer prefetch and other settings; a setting that fails
    gives {"failed": reason} (its cell says so) instead of ending the run."""
    try:
        return _measure_ours(base, budget, quant, store, "cross-layer", a, **over)
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - one setting failing must not lose the others' rows
        traceback.print_exc(limit=3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"}


def _variant_cell(g: dict) -> str:
    if "failed" in g:
        return f"failed: {g['failed']}"
    return (f"{g['decode_tokens_per_s']:.2f} / {g['expert_hit_rate']:.2f} / "
            f"{g['bytes_to_device_per_token'] / 2**20:.2f}"
            + (f" ({g['experts_on_host_per_token']:.2f} experts on the host / token)"
               if g["experts_on_host_per_token"] else "")
            + (f" ({g['tokens_per_step']:.2f} tokens / step)" if g["tokens_per_step"] != 1
               else ""))


def _bound(r: dict, total: int, h2d: float | None) -> float | None:
    """PCIe bound tok/s: the uncached share of the experts a token uses, over the link."""
    must_move = r["experts_used_per_token"] * max(0.0, 1 - r["expert_slots"] / total) \
        * r["expert_bytes"]
    return h2d / must_move if h2d and must_move else None


def _row(f, slots, total, budget, quant, r, base_run, hf_tps, hf_label, h2d,
         variants: list[dict]) -> list[str]:
    bound, ours = _bound(r, total, h2d), r["decode_tokens_per_s"]
    return [f"{slots}/{total} ({f:.0%})", f"{budget / 2**30:.2f}", quant,
            f"{r['expert_slots']}/{total}", f"{ours:.2f}",
            f"{base_run['decode_tokens_per_s']:.2f}",
            f"{hf_tps:.2f}" if hf_tps else hf_label,
            f"{bound:.2f}" if bound else "n/a (all cached)" if h2d else "n/a",
            f"{bound / ours:.2f} / {bound / base_run['decode_tokens_per_s']:.2f}" if bound
            else "n/a",
            f"{ours / hf_tps:.1f}" if hf_tps else "n/a",
            f"{r['expert_hit_rate']:.2f} / {base_run['expert_hit_rate']:.2f}",
            f"{r['prefetch_precision']:.2f} / {r['prefetch_recall']:.2f} / "
            f"{r['prefetch_withheld']:.2f}",
            f"{r['bytes_to_device_per_token'] / 2**20:.2f} / "
            f"{base_run['bytes_to_device_per_token'] / 2**20:.2f}"] + [
        _variant_cell(g) for g in variants]


def _batch_row(f: float, quant: str, r: dict, one: dict) -> list[str]:
    """A row of the batching table: r at batch b next to `one`, the same setting at batch 1."""
    tps = r["decode_tokens_per_s"]
    return [f"{f:.0%}", quant, str(r["batch"]), str(r["expert_slots"]), f"{tps:.2f}",
            f"{tps / r['batch']:.2f}", f"{tps / one['decode_tokens_per_s']:.2f}",
            f"{r['bytes_to_device_per_token'] / 2**20:.2f}",
            f"{one['bytes_to_device_per_token'] / 2**20:.2f}",
            f"{r['experts_used_per_token']:.2f}", f"{r['expert_hit_rate']:.2f}"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="mixtral",
                   help="layer shapes of the random model (deepseek-v2-lite: MLA, 64 experts "
                   "top-6, 2 shared, a dense first layer; gpt-oss-20b: MXFP4 experts, 32 "
                   "top-4, sinks, a window every other layer)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--quants", default="none,int8",
                   help="expert formats for our rows (int8 / int4: packed slots under the "
                   "same budget, so more experts fit; mxfp4: gpt-oss-20b's experts as stored; "
                   "none there decodes them to the compute dtype at load)")
    p.add_argument("--cache-policy", choices=CACHE_POLICIES, default="lru",
                   help="our rows' expert cache policy")
    p.add_argument("--batches", default="1,4",
                   help="batch sizes of the batching table (1 alone: no such table)")
    p.add_argument("--prefetch-min-weights", default="",
                   help="comma-separated confidence bars W: a column each for ours with "
                   "prefetch gated at W (--prefetch-min-weight)")
    p.add_argument("--prefetch-min-precisions", default="",
                   help="comma-separated precision bars P: a column each for ours with the "
                   "prefetch's copies gated at P (--prefetch-min-precision; 0: every "
                   "prediction copied, no gate)")
    p.add_argument("--prefetch-fractions", default="",
                   help="comma-separated shares F: a column each for ours copying F of each "
                   "predicted expert ahead, the rest when used (--prefetch-fraction), with "
                   "every prediction copied (no precision gate)")
    p.add_argument("--host-compute-tokens", default="",
                   help="comma-separated counts N: a column each for ours with the misses "
                   "that at most N of a step's tokens use run on the host CPU "
                   "(--host-compute-tokens)")
    p.add_argument("--skip-miss-weights", default="",
                   help="comma-separated bars W: a column each for ours skipping missing "
                   "experts that every token using them weighs below W (--skip-miss-weight; "
                   "approximate: random weights say nothing of the answers' fidelity, "
                   "bench/serve_skip.py does on a trained model)")
    p.add_argument("--stand-in-weights", default="",
                   help="comma-separated bars W: a column each for ours running missing "
                   "experts that every token using them weighs below W from int4 copies "
                   "(--miss-quant int4 --miss-quant-weight W; approximate)")
    p.add_argument("--speculate", default="",
                   help="comma-separated K: a column each for ours drafting up to K tokens "
                   "a step by prompt lookup (--speculate)")
    p.add_argument("--fp8", action="store_true",
                   help="write the experts as an FP8 block-scaled checkpoint (DeepSeek-V3's "
                   "layout): --quants fp8 keeps them FP8 on the wire and in their slots, "
                   "none widens them at read; the transformers baseline is skipped (its FP8 "
                   "path needs kernels)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--dir", default=None, help="where the random model is written")
    p.add_argument("--out", default="bench/RESULTS.md")
    p.add_argument("--json-out", default=None, help="also write every measurement here")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mcfg, family, shape = bench_model(a.shape, a.layers, a.smoke)
    root = scratch_dir(a.dir, "moe-serve-bench-")
    print(f"writing a {a.layers}-layer random model to {root}", file=sys.stderr)
    if a.fp8 and family == "gpt_oss":
        p.error("--fp8 writes per-expert FP8 weights; gpt-oss-20b stores MXFP4")
    write_model(root, mcfg, family, dtype,
                fp8=((32, 32) if a.smoke else FP8_BLOCK) if a.fp8 else None)
    max_context = a.prompt_len + a.new_tokens + 8
    base = ServeConfig(model=str(root), device=device.type, dtype=str(dtype)[6:],
                       max_context=max_context, cache_policy=a.cache_policy)
    quants = [q for q in a.quants.split(",") if q]
    stores = {q: WeightStore(root, dtype, quant=q, pin=device.type == "cuda", verbose=True,
                             host_budget=None if device.type == "cuda" else 0)
              for q in quants}
    store = stores.get("none") or WeightStore(root, dtype, "none", verbose=True, host_budget=0)
    fixed, slot, _ = memory_plan(store, base, dtype, 1, max_context)
    total = store.total_experts
    h2d = h2d_bandwidth(device)
    rows, records, batch_rows = [], [], []
    batches = sorted({int(b) for b in a.batches.split(",") if b} - {1})
    # columns of ours with other settings: (label, ServeConfig fields)
    variants = [(f"prefetch gated at {float(w):g}", {"prefetch_min_weight": float(w)})
                for w in a.prefetch_min_weights.split(",") if w] + [
        ("prefetch, no precision gate" if float(pr) == 0 else
         f"prefetch gated at precision {float(pr):g}", {"prefetch_min_precision": float(pr)})
        for pr in a.prefetch_min_precisions.split(",") if pr] + [
        (f"prefetch of {float(f):g} of each expert, no precision gate",
         {"prefetch_fraction": float(f), "prefetch_min_precision": 0.0})
        for f in a.prefetch_fractions.split(",") if f] + [
        (f"misses of <= {int(n)} tokens on the host", {"host_compute_tokens": int(n)})
        for n in a.host_compute_tokens.split(",") if n] + [
        (f"speculating {int(k)}", {"speculate": int(k)}) for k in a.speculate.split(",") if k] + [
        (f"skipping misses below {float(w):g} (approx.)", {"skip_miss_weight": float(w)})
        for w in a.skip_miss_weights.split(",") if w] + [
        (f"int4 stand-ins below {float(w):g} (approx.)",
         {"miss_quant": "int4", "miss_quant_weight": float(w)})
        for w in a.stand_in_weights.split(",") if w]
    stopped = None
    try:
        with stop_on_sigterm():
            for f in (float(x) for x in a.fractions.split(",")):
                slots = max(1, round(f * total))
                budget = fixed + slots * slot  # f of the experts in the compute dtype
                # ours first: a time limit that stops the (slow) baseline keeps our rows
                ours_runs = {q: [_measure_ours(base, budget, q, stores[q], prefetch, a)
                                 for prefetch in ("cross-layer", "none")]
                             + [_measure_variant(base, budget, q, stores[q], a, **over)
                                for _, over in variants]
                             for q in quants}
                hf_tps, hf_label, stop = None, "skipped", None
                if not (a.skip_hf or a.fp8):
                    try:
                        hf_tps, hf_label = hf_decode_tokens_per_s(
                            root, budget, a.prompt_len, a.new_tokens, device, dtype)
                    except Stopped as e:
                        hf_label, stop = "stopped by the time limit", e
                    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
                        hf_label = f"failed: {type(e).__name__}: {str(e)[:80]}"
                for q in quants:
                    ours, base_run, *others = ours_runs[q]
                    rows.append(_row(f, slots, total, budget, q, ours, base_run, hf_tps,
                                     hf_label, h2d, others))
                    records.append({"fraction": f, "quant": q, "ours": ours,
                                    "no_prefetch": base_run, "hf": hf_tps, "hf_label": hf_label,
                                    "pcie_bound": _bound(ours, total, h2d),
                                    "variants": dict(zip([v for v, _ in variants], others,
                                                         strict=True))})
                    # batched: the same slots, the budget grown by b rows of KV cache
                    for b in batches if stop is None else ():
                        grown = budget + memory_plan(store, base, dtype, b, max_context)[0] \
                            - fixed
                        rb = _measure_ours(base, grown, q, stores[q], "cross-layer", a, b)
                        batch_rows.append(_batch_row(f, q, rb, ours))
                        records.append({"fraction": f, "quant": q, "batch": b, "ours": rb})
                if stop:
                    raise stop
    except Stopped:
        stopped = "stopped by SIGTERM (timeout); the rows are those measured before it"
        print(stopped, file=sys.stderr, flush=True)
    header = [f"budget: {str(dtype)[6:]} experts", "budget GiB", "expert format", "slots",
              "ours tok/s", "ours no-prefetch tok/s",
              "transformers+accelerate tok/s" if device.type == "cuda"
              else "transformers (CPU, no offload) tok/s", "PCIe bound tok/s",
              "bound / ours (pf / no pf)",
              "ours / transformers", "hit rate (pf / no pf)", "prefetch prec / recall / withheld",
              "MiB moved / token (pf / no pf)"] + [
        f"{v}: tok/s / hit rate / MiB per token" for v, _ in variants]
    table = markdown_table(header, rows)
    if batch_rows:
        table += "\n\nBatched decode (ours, cross-layer prefetch; the expert slots of the " \
            "batch-1 row, the budget grown by the KV cache of the extra rows):\n\n" + \
            markdown_table(["budget", "expert format", "batch", "slots", "tok/s (all rows)",
                            "tok/s per sequence", "vs batch 1", "MiB moved / token",
                            "MiB moved / token at batch 1", "experts used / token",
                            "hit rate"], batch_rows)
    print(table)
    shape_txt = f"{a.shape} ({family} layout): " + ", ".join(
        f"{k}={v}" for k, v in shape.items())
    if records:  # what a token's KV-cache entry takes (MLA: one latent per layer)
        kv = records[0]['ours']['kv_cache_bytes_per_token']
        shape_txt += f"; KV cache {kv / 2**10:.1f} KiB per token"
    body = (f"Shapes: {shape_txt}, {a.layers} layers, {dtype}; prompt {a.prompt_len}, "
            f"{a.new_tokens} greedy new tokens, cache policy {a.cache_policy}, batch 1 in the "
            f"first table. Ours prefetches across layers, copying a layer's predictions while "
            f"their precision reaches {base.prefetch_min_precision:g} (serve/prefetch_gate.py;"
            f" 'withheld': the share of layer predictions scored without copies). Measured "
            f"pinned H2D: {h2d / 1e9:.1f} GB/s.\n\n" if h2d else
            f"Shapes: {shape_txt}, {a.layers} layers, {dtype}; prompt {a.prompt_len}, "
            f"{a.new_tokens} new tokens, cache policy {a.cache_policy} (CPU smoke run: no "
            "PCIe).\n\n") \
        + (f"**Partial**: {stopped}.\n\n" if stopped else "") + table
    append_results(a.out, "Offloaded decode (bench/serve.py)",
                   command_line("bench.serve", argv), device, body)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(records, indent=1))
    if stopped:
        raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
