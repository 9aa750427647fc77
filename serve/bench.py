"""`moe-serve bench`: prefill and decode speed, expert hit rate, bytes moved, and S-MBU /
S-MFU as MoE-CAP (Jiang et al. 2024) defines them for sparse models: the bytes and FLOPs of
the parameters a decode step actually activates (non-expert weights + the experts its tokens
chose) and its KV cache reads, over the step time and the device's peak."""

from __future__ import annotations

import time

import torch

from kernels.device import peak_bandwidth, peak_flops
from serve.config import ServeConfig
from serve.generate import DecodeBatch
from serve.kvcache import KVCache
from serve.runtime import OffloadedModel


def device_peaks(device: torch.device) -> tuple[float, float, str]:
    """(peak FLOP/s, peak bytes/s, where they come from)."""
    flops, src_f = peak_flops(device)
    bw, src_b = peak_bandwidth(device)
    return flops, bw, src_f if src_f == src_b else f"{src_f}, {src_b}"


def h2d_bandwidth(device: torch.device) -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (None on the CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * src.nbytes / (time.perf_counter() - t)


# lengths `moe-serve bench` times unless told: a prompt and the tokens decoded after it
PROMPT_LEN, NEW_TOKENS = 128, 32


def fit_lengths(max_context: int, prompt_len: int | None, new_tokens: int | None
                ) -> tuple[int, int]:
    """(prompt_len, new_tokens) within max_context: a length not given defaults to PROMPT_LEN /
    NEW_TOKENS, shortened to fit; lengths given that do not fit raise ValueError naming the
    flags."""
    if prompt_len is not None and new_tokens is not None:
        if prompt_len + new_tokens > max_context:
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = "
                             f"{prompt_len + new_tokens} exceeds the context of {max_context} "
                             "tokens; lower them or raise --max-context")
        return prompt_len, new_tokens
    if max_context < 2:
        raise ValueError(f"a context of {max_context} token(s) holds no prompt and new token")
    if new_tokens is None:
        room = max_context - (prompt_len if prompt_len is not None else 1)
        if room < 1:
            raise ValueError(f"--prompt-len {prompt_len} leaves no room for a new token in the "
                             f"context of {max_context} tokens")
        new_tokens = min(NEW_TOKENS, room, max(1, max_context // 4))
    if prompt_len is None:
        if new_tokens >= max_context:
            raise ValueError(f"--new-tokens {new_tokens} leaves no room for a prompt in the "
                             f"context of {max_context} tokens")
        prompt_len = min(PROMPT_LEN, max_context - new_tokens)
    return prompt_len, new_tokens


def run_bench(cfg: ServeConfig, prompt_len: int | None = None, new_tokens: int | None = None,
              batch: int = 1, seed: int = 0, verbose: bool = False) -> dict:
    """Random prompts of prompt_len tokens, greedy decode of new_tokens -> a report dict. A
    length left None takes its default, shortened to fit the model's context (fit_lengths)."""
    model = OffloadedModel(cfg, verbose=verbose)
    prompt_len, new_tokens = fit_lengths(model.max_context, prompt_len, new_tokens)
    return measure(model, prompt_len, new_tokens, batch, seed)


def decode_all(decoder: DecodeBatch) -> tuple[int, float]:
    """Step decoder until no row is live -> (steps, seconds, the device's work included)."""
    t0 = time.perf_counter()
    steps = 0
    while decoder.live:
        decoder.step()
        steps += 1
    decoder.model.synchronize()
    return steps, time.perf_counter() - t0


def measure(model: OffloadedModel, prompt_len: int, new_tokens: int, batch: int = 1,
            seed: int = 0) -> dict:
    """Time a prefill and new_tokens greedy decode steps of `model` -> a report dict."""
    cfg = model.scfg
    m, dev = model.cfg, model.device
    if prompt_len + new_tokens > model.max_context:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the "
                         f"context of {model.max_context}")
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, m.vocab_size, (batch, prompt_len), generator=gen).tolist()
    # greedy, no stop tokens; every prompt read whole (a warm-up may have read the same one)
    decoder = DecodeBatch(model, capacity=batch, reuse_prefix=False)
    model.reset_stats()
    model.synchronize()
    t0 = time.perf_counter()
    seqs = decoder.add(prompts, [new_tokens + 1] * batch)  # the first token and new_tokens more
    while any(r.pending for r in seqs):  # equal prompts: every step is a prefill chunk
        decoder.step()
    model.synchronize()
    prefill_s = time.perf_counter() - t0
    pre = model.stats()
    model.reset_stats()
    steps, decode_s = decode_all(decoder)  # new_tokens each, one a step (more: speculation)
    dec = model.stats()
    el = torch.finfo(model.dtype).bits // 8
    # (layer, expert) uses in decode: on the device (hits, misses), and all (with the host's)
    on_device = dec["expert_hits"] + dec["expert_misses"]
    activated = on_device + dec["experts_on_host"]
    expert_params = 3 * m.moe.expert_ffn * m.d_model
    dense_params = model.store.dense_nbytes() // el
    mean_ctx = prompt_len + (new_tokens + 1) / 2
    kv_token = KVCache.token_nbytes(m, model.dtype, model.scfg.kv_cache_dtype)  # all layers
    kv_bytes = kv_token * batch * mean_ctx  # (MLA: latents; others: every KV head's k, v)
    step_s = decode_s / steps
    # the device's reads and FLOPs a step (S-MBU and S-MFU are the device's; the host's
    # apart); an expert read is its slot's bytes (packed when quantized)
    per_step = new_tokens / steps  # tokens a row gains a step
    bytes_step = dense_params * el + on_device / steps * model.slot_bytes + kv_bytes
    flops_step = 2 * batch * per_step * (dense_params + on_device / new_tokens / batch
                                         * expert_params) \
        + 4 * batch * m.n_layers * m.n_heads * m.resolved_head_dim * mean_ctx
    peak_flops, peak_bw, peak_src = device_peaks(dev)
    h2d = h2d_bandwidth(dev)
    moved_per_token = dec["bytes_to_device"] / (new_tokens * batch)
    return {
        "model": cfg.model, "device": str(dev) if dev.type == "cpu" else
        torch.cuda.get_device_name(dev), "dtype": str(model.dtype).replace("torch.", ""),
        "memory_budget": cfg.memory_budget, "expert_slots": model.n_slots,
        "total_experts": model.store.total_experts,
        "cache_policy": cfg.cache_policy, "prefetch": cfg.prefetch,
        "prefetch_min_weight": cfg.prefetch_min_weight,
        "prefetch_min_precision": cfg.prefetch_min_precision, "quant": model.store.quant,
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * new_tokens / decode_s,
        "expert_hit_rate": dec["expert_hit_rate"], "prefill_hit_rate": pre["expert_hit_rate"],
        "prefetch_precision": dec["prefetch_precision"],
        "prefetch_recall": dec["prefetch_recall"],
        # the share of layer predictions the precision gate scored without copying
        "prefetch_withheld": dec["prefetch_withheld"] / max(1, dec["prefetch_withheld"]
                                                          + dec["prefetch_copied"]),
        "experts_used_per_token": activated / (new_tokens * batch),
        "experts_on_host_per_token": dec["experts_on_host"] / (new_tokens * batch),
        "experts_skipped_per_token": dec["experts_skipped"] / (new_tokens * batch),
        "experts_low_precision_per_token": dec["experts_low_precision"] / (new_tokens * batch),
        "decode_steps": steps, "tokens_per_step": per_step,
        "expert_bytes": model.store.expert_nbytes, "kv_cache_bytes_per_token": kv_token,
        "bytes_to_device_per_token": moved_per_token,
        "bytes_to_device": pre["bytes_to_device"] + dec["bytes_to_device"],
        "s_mbu": bytes_step / step_s / peak_bw, "s_mfu": flops_step / step_s / peak_flops,
        "peak_source": peak_src,
        "h2d_bytes_per_s": h2d,
        "pcie_bound_tokens_per_s": (h2d / moved_per_token if h2d and moved_per_token else None),
    }


def format_report(r: dict) -> str:
    rows = [("decode tokens/s", f"{r['decode_tokens_per_s']:.2f}"),
            ("prefill tokens/s", f"{r['prefill_tokens_per_s']:.1f}"),
            ("expert hit rate (decode)", f"{r['expert_hit_rate']:.3f}"),
            ("prefetch precision / recall",
             f"{r['prefetch_precision']:.3f} / {r['prefetch_recall']:.3f}"),
            ("bytes to device per token", f"{r['bytes_to_device_per_token'] / 2**20:.2f} MiB"),
            ("experts run on the host per token", f"{r['experts_on_host_per_token']:.2f}"),
            ("missing experts skipped per token", f"{r['experts_skipped_per_token']:.2f}"),
            ("low-precision stand-ins per token",
             f"{r['experts_low_precision_per_token']:.2f}"),
            ("S-MBU", f"{r['s_mbu']:.4f}"), ("S-MFU", f"{r['s_mfu']:.5f}"),
            ("expert slots", f"{r['expert_slots']}/{r['total_experts']}"),
            ("KV cache per token", f"{r['kv_cache_bytes_per_token'] / 2**10:.1f} KiB")]
    if r["pcie_bound_tokens_per_s"]:
        rows.append(("PCIe bound tokens/s", f"{r['pcie_bound_tokens_per_s']:.2f}"))
    w = max(len(k) for k, _ in rows)
    head = (f"{r['model']} on {r['device']} ({r['dtype']}), batch {r['batch']}, prompt "
            f"{r['prompt_len']}, {r['new_tokens']} new tokens, policy {r['cache_policy']}, "
            f"prefetch {r['prefetch']}, quant {r['quant']}; peaks: {r['peak_source']}")
    return head + "\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
