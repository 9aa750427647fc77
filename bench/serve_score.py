"""Scoring continuations on the offloaded runtime, as lm-evaluation-harness's loglikelihood
tasks ask (multiple choice: one context, a continuation per choice, every token's
log-probability): each question's prompts read whole, against prefix reuse with the prompts
sent one at a time (a row keeps the scores it computed; the next continuation takes the
scored context) and sent together (one row reads the context, the others copy it with its
scores). Same model, same budget, same prompts; the scores of every mode are compared with
those of the whole reads.

    python -m bench.serve_score --smoke        # CPU: tiny shapes, checks the script
    python -m bench.serve_score                # GPU: Mixtral-8x7B layer shapes, 4 layers
    python -m bench.serve_score --shape deepseek-v2-lite --layers 3 --device cpu

Appends a table to bench/RESULTS.md: time, prompt tokens read, expert bytes moved, and the
largest score difference from the whole reads.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import append_results, command_line, markdown_table, scratch_dir
from bench.serve import SHAPES, bench_model, write_model
from serve.config import CACHE_POLICIES, ServeConfig
from serve.generate import generate
from serve.runtime import OffloadedModel, memory_plan
from serve.sampling import SamplingConfig
from serve.store import WeightStore

# mode -> (prefix reuse, a question's prompts sent together)
MODES = {"whole": (False, True), "reuse, one at a time": (True, False),
         "reuse, together": (True, True)}


def run_mode(model: OffloadedModel, questions: list[list[list[int]]], together: bool
             ) -> dict:
    """Score every prompt of every question -> time, tokens read, bytes moved, and each
    prompt's scores (log-probabilities of its tokens 1..)."""
    scored = SamplingConfig(logprobs=1, prompt_logprobs=True)
    model.synchronize()
    model.reset_stats()
    t0 = time.perf_counter()
    scores, read, total = [], 0, 0
    for q, prompts in enumerate(questions):
        runs = [generate(model, prompts, 1, scored)] if together else [
            generate(model, [p], 1, scored) for p in prompts]
        for res in runs:
            scores += [[e[0] for e in lps[1:]] for lps in res.prompt_logprobs]
            read += res.stats["prompt_tokens"] - res.stats["cached_tokens"]
            total += res.stats["prompt_tokens"]
        print(f"  question {q + 1}/{len(questions)}", file=sys.stderr, flush=True)
    model.synchronize()
    return {"s": time.perf_counter() - t0, "read": read, "tokens": total,
            "bytes": model.stats()["bytes_to_device"], "scores": scores}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="mixtral")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--questions", type=int, default=None, help="default 8; --smoke 3")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--context-tokens", type=int, default=None,
                   help="each question's context (default 256; --smoke 24)")
    p.add_argument("--continuation-tokens", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.25,
                   help="share of the experts the budget's slots hold")
    p.add_argument("--cache-policy", choices=CACHE_POLICIES, default="lru")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--dir", default=None, help="where the random model is written")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    for name, full, smoke in (("questions", 8, 3), ("context_tokens", 256, 24)):
        if getattr(a, name) is None:
            setattr(a, name, smoke if a.smoke else full)
    cuda = torch.cuda.is_available() and a.device != "cpu" and not a.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mcfg, family, _ = bench_model(a.shape, a.layers, a.smoke)
    max_context = a.context_tokens + a.continuation_tokens + 8
    if max_context > mcfg.max_seq_len:
        raise SystemExit(f"a prompt needs {max_context} tokens of context; the model has "
                         f"{mcfg.max_seq_len}")
    root = scratch_dir(a.dir, "moe-serve-score-")
    print(f"writing a {a.layers}-layer random model to {root}", file=sys.stderr)
    write_model(root, mcfg, family, dtype)
    store = WeightStore(root, dtype, "none", pin=cuda, host_budget=None if cuda else 0,
                        verbose=True)
    base = ServeConfig(model=str(root), device=device.type, dtype=str(dtype)[6:],
                       max_context=max_context, max_batch=a.choices,
                       cache_policy=a.cache_policy)
    fixed, slot, _ = memory_plan(store, base, dtype, a.choices, max_context)
    total = store.total_experts
    slots = max(1, round(a.fraction * total))
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1, mcfg.vocab_size, (n,), generator=gen).tolist()

    questions = []
    for _ in range(a.questions):
        context = ids(a.context_tokens)
        questions.append([context + ids(a.continuation_tokens) for _ in range(a.choices)])
    runs = {}
    for mode, (reuse, together) in MODES.items():
        cfg = ServeConfig(**{**base.__dict__, "memory_budget": fixed + slots * slot,
                             "prefix_cache": reuse})
        model = OffloadedModel(cfg, store=store)
        generate(model, [ids(8)], 2)  # warm-up (kernels); its rows are overwritten
        print(f"{mode}:", file=sys.stderr, flush=True)
        runs[mode] = run_mode(model, questions, together)
        del model
    ref = runs["whole"]
    rows = []
    for mode, r in runs.items():
        diff = max(abs(x - y) for got, want in zip(r["scores"], ref["scores"], strict=True)
                   for x, y in zip(got, want, strict=True))
        rows.append([mode, f"{r['s']:.2f}", f"{ref['s'] / r['s']:.2f}", str(r["read"]),
                     f"{r['bytes'] / 2**20:.1f}", f"{r['tokens'] / r['s']:.0f}",
                     f"{diff:.1e}"])
    table = markdown_table(["mode", "seconds", "speed-up vs whole", "prompt tokens read",
                            "expert MiB moved", "prompt tokens scored / s",
                            "largest |score - whole's|"], rows)
    body = (f"Shapes: {a.shape}{' (smoke sizes)' if a.smoke else ''}, {a.layers} layers, "
            f"{str(dtype)[6:]}, random weights; budget holds {slots}/{total} experts "
            f"({a.cache_policy}, cross-layer prefetch); {a.questions} questions of "
            f"{a.choices} choices: a {a.context_tokens}-token context and a "
            f"{a.continuation_tokens}-token continuation each, every token scored "
            f"(prompt log-probabilities, 1 alternative); {a.choices} KV rows.\n\n{table}\n")
    print(body)
    append_results(a.out, "Scoring continuations: scored prefix reuse (bench/serve_score.py)",
                   command_line("bench.serve_score", argv), device, body)


if __name__ == "__main__":
    main()
