"""A multi-turn chat on the offloaded runtime: each turn's time to first token and the expert
bytes its prefill moves, with prefix reuse (the KV row holds the conversation so far; the turn
reads only the new message) against reading every prompt whole, layer by layer (each
expert once per layer) and chunk after chunk through every layer (the experts again for every
chunk), same model, same budget, same conversation.

    python -m bench.serve_turns --smoke            # CPU: tiny shapes, checks the script
    python -m bench.serve_turns                    # GPU: Mixtral-8x7B layer shapes, 4 layers
    python -m bench.serve_turns --shape deepseek-v2-lite --layers 2 --device cpu

Turn t's prompt is turn t-1's prompt, its answer and a new message of --message-tokens
random tokens (a chat template adds a few tokens around each message; random ids stand for
them). Answers are greedy, --answer-tokens long (no stop token), and come from the run with
prefix reuse; the runs without it read the same prompts. Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import append_results, command_line, markdown_table, scratch_dir
from bench.serve import SHAPES, bench_model, write_model
from serve.config import CACHE_POLICIES, ServeConfig
from serve.generate import DecodeBatch, generate
from serve.runtime import OffloadedModel, memory_plan
from serve.store import WeightStore


def run_turns(model: OffloadedModel, prompts: list[list[int]] | None, first: list[int],
              messages: list[list[int]], answer_tokens: int, layerwise: bool = True
              ) -> tuple[list[dict], list[list[int]]]:
    """The conversation's turns on `model` -> (per turn: prompt and cached tokens, time to
    first token, expert bytes its prefill moved; the prompts read). prompts: the turns'
    prompts to read (None: build them from first, messages and the answers); layerwise:
    a prompt's chunks go layer by layer (False: chunk after chunk through every layer)."""
    turns, read = [], []
    prompt = first
    # greedy, no stop token; prefix reuse as model.scfg says
    batch = DecodeBatch(model, layerwise=layerwise)
    for t in range(len(messages) + 1):
        if prompts is not None:
            prompt = prompts[t]
        model.synchronize()
        model.reset_stats()
        t0 = time.perf_counter()
        (row,) = batch.add([prompt], [answer_tokens])
        while not row.out:  # the prefill, then the first token
            batch.step()
        model.synchronize()
        turn = {"prompt_tokens": len(prompt), "cached_tokens": row.cached,
                "ttft_s": time.perf_counter() - t0,
                "prefill_bytes": model.stats()["bytes_to_device"]}
        while not row.done:
            batch.step()
        turns.append(turn)
        read.append(prompt)
        print(f"turn {t + 1}: {len(prompt)} prompt tokens, {row.cached} cached, ttft "
              f"{turn['ttft_s'] * 1e3:.0f} ms, prefill moved "
              f"{turn['prefill_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        if t < len(messages):
            prompt = prompt + row.out + messages[t]
    return turns, read


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="mixtral")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--first-tokens", type=int, default=None,
                   help="the first prompt's tokens (default 128; --smoke 32)")
    p.add_argument("--message-tokens", type=int, default=None,
                   help="each later message's (default 48; --smoke 16)")
    p.add_argument("--answer-tokens", type=int, default=None, help="default 32; --smoke 8")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="share of the experts the budget's slots hold")
    p.add_argument("--cache-policy", choices=CACHE_POLICIES, default="lru")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--dir", default=None, help="where the random model is written")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    for name, full, smoke in (("first_tokens", 128, 32), ("message_tokens", 48, 16),
                              ("answer_tokens", 32, 8)):
        if getattr(a, name) is None:
            setattr(a, name, smoke if a.smoke else full)
    if a.turns < 2:
        raise SystemExit("--turns must be >= 2 (the first turn has nothing to reuse)")
    cuda = torch.cuda.is_available() and a.device != "cpu" and not a.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mcfg, family, _ = bench_model(a.shape, a.layers, a.smoke)
    root = scratch_dir(a.dir, "moe-serve-turns-")
    print(f"writing a {a.layers}-layer random model to {root}", file=sys.stderr)
    write_model(root, mcfg, family, dtype)
    length = a.first_tokens + (a.turns - 1) * (a.answer_tokens + a.message_tokens)
    max_context = length + a.answer_tokens + 8
    if max_context > mcfg.max_seq_len:
        raise SystemExit(f"the conversation needs {max_context} tokens of context; the model "
                         f"has {mcfg.max_seq_len}: fewer --turns or tokens")
    store = WeightStore(root, dtype, "none", pin=cuda, host_budget=None if cuda else 0,
                        verbose=True)
    base = ServeConfig(model=str(root), device=device.type, dtype=str(dtype)[6:],
                       max_context=max_context, cache_policy=a.cache_policy,
                       prefill_chunk=a.prefill_chunk)
    fixed, slot, _ = memory_plan(store, base, dtype, 1, max_context)
    total = store.total_experts
    slots = max(1, round(a.fraction * total))
    gen = torch.Generator().manual_seed(0)
    vocab = mcfg.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=gen).tolist()

    first, messages = ids(a.first_tokens), [ids(a.message_tokens) for _ in range(a.turns - 1)]
    modes = {"reuse": (True, True), "whole": (False, True), "chunks": (False, False)}
    runs, prompts = {}, None
    for mode, (reuse, layerwise) in modes.items():
        cfg = ServeConfig(**{**base.__dict__, "memory_budget": fixed + slots * slot,
                             "prefix_cache": reuse})
        model = OffloadedModel(cfg, store=store)
        generate(model, [ids(8)], 2)  # warm-up (kernels); its row is overwritten
        print(f"{mode}:", file=sys.stderr)
        runs[mode], prompts = run_turns(model, prompts, first, messages, a.answer_tokens,
                                        layerwise)
        del model
    on, off, old = runs["reuse"], runs["whole"], runs["chunks"]
    rows = []
    for t, (x, y, z) in enumerate(zip(on, off, old, strict=True)):
        rows.append([str(t + 1), str(x["prompt_tokens"]), str(x["cached_tokens"])]
                    + [f"{r['ttft_s'] * 1e3:.1f}" for r in (x, y, z)]
                    + [f"{r['prefill_bytes'] / 2**20:.1f}" for r in (x, y, z)])
    later = slice(1, None)  # the turns that have something to reuse

    def summed(run: list[dict], key: str) -> float:
        return sum(r[key] for r in run[later])

    header = ["turn", "prompt tokens", "cached"] + [
        f"{what} ({mode})" for what in ("ttft ms", "prefill MiB moved")
        for mode in ("reuse", "whole, layer by layer", "whole, chunk after chunk")]
    table = markdown_table(header, rows)
    dev = torch.cuda.get_device_name(device) if cuda else "CPU"
    body = (f"Shapes: {a.shape}{' (smoke sizes)' if a.smoke else ''}, {a.layers} layers, "
            f"{str(dtype)[6:]}, random weights; budget holds {slots}/{total} experts "
            f"({a.cache_policy}, cross-layer prefetch); first prompt {a.first_tokens} tokens, "
            f"then {a.turns - 1} turns of a {a.message_tokens}-token message; answers "
            f"{a.answer_tokens} greedy tokens; prefill chunk {a.prefill_chunk}. Prefill MiB "
            "moved: expert bytes copied to the device from the turn's start to its first "
            "token.\n\n"
            f"{table}\n\nTurns 2-{a.turns}, time to first token: {summed(on, 'ttft_s'):.2f} s "
            f"with reuse, {summed(off, 'ttft_s'):.2f} s reading whole prompts layer by layer, "
            f"{summed(old, 'ttft_s'):.2f} s chunk after chunk; expert bytes their prefills "
            f"moved: {summed(on, 'prefill_bytes') / 2**20:.0f}, "
            f"{summed(off, 'prefill_bytes') / 2**20:.0f} and "
            f"{summed(old, 'prefill_bytes') / 2**20:.0f} MiB ({dev}).\n")
    print(body)
    append_results(a.out, "Multi-turn chat: prefix reuse (bench/serve_turns.py)",
                   command_line("bench.serve_turns", argv), device, body)


if __name__ == "__main__":
    main()
