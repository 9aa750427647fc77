"""Light missing experts on a served model, skipped (--skip-miss-weight W) or run from
low-precision stand-ins (--miss-quant int4 --miss-quant-weight W, serve/skip.py), every
expert quantized (--quant int4), an int8 KV cache (more expert slots) and an FP8 copy of the
model (moe-serve convert; experts FP8 in their slots or widened at read): what each saves
(expert bytes moved per token, decode speed) against what it costs (how far the answers move
from the exact ones), side by side with exact serving under the same budget.

    make demo && python -m bench.serve_skip --model runs/demo/hf --memory-budget 8.5MiB
    python -m bench.serve_skip --model DIR --weights 0.3 --stand-in-weights 0.3,0.5 \
        --stand-in-quant int4 --quant-everywhere int4
    moe-serve convert --model DIR --out DIR-fp8 --block 32,32 && \
        python -m bench.serve_skip --model DIR --weights "" --fp8-model DIR-fp8

Quality, two ways: greedy answers decoded freely (how many tokens each keeps before it first
differs from the exact answer), and the exact answer fed back token by token (teacher
forcing, decode steps as serving runs them): how often the next-token argmax agrees with
exact serving's and the mean KL divergence from its distribution. A trained model is needed
for the quality figures to mean anything (random weights route at random).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import append_results, command_line, markdown_table
from bench.serve_speculate import prompt_texts
from bench.serve_speculate import run as answers_of
from serve.config import ServeConfig
from serve.generate import generate
from serve.runtime import OffloadedModel
from serve.text import TextCodec


@torch.no_grad()
def forced(model: OffloadedModel, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The log-probabilities [len(answer), V] before each answer token, the prompt read in
    one step and the answer fed a token a step (KV-cache row 0)."""
    dev = model.device
    logits = [model.step(torch.tensor([prompt], device=dev), [0], [0], [len(prompt)])]
    for j, t in enumerate(answer[:-1]):
        logits.append(model.step(torch.tensor([[t]], device=dev), [0], [len(prompt) + j], [1]))
    return torch.cat(logits).float().log_softmax(-1).cpu()


def run(model: OffloadedModel, prompts: list[list[int]], new_tokens: int,
        exact: dict | None) -> dict:
    """Free greedy answers (bench.serve_speculate.run: tokens, bytes, seconds, skipped
    experts) and the log-probabilities of teacher forcing along the exact run's answers
    (this run's, without one)."""
    out = answers_of(model, prompts, new_tokens)
    answers = out["tokens"] if exact is None else exact["tokens"]
    out["logp"] = [forced(model, p, a) for p, a in zip(prompts, answers, strict=True)]
    return out


def _kept_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a served model directory (with tokenizer)")
    p.add_argument("--prompts", default=None, help='prompts separated by "---" lines '
                   "(default: bench/serve_speculate.py's code prompts)")
    p.add_argument("--weights", default="0.1,0.2,0.3,0.5",
                   help="comma-separated skip_miss_weight bars to compare with exact serving")
    p.add_argument("--stand-in-weights", default="",
                   help="comma-separated miss_quant_weight bars: light missing experts run "
                   "from --stand-in-quant copies instead")
    p.add_argument("--stand-in-quant", choices=["int8", "int4"], default="int4")
    p.add_argument("--stand-in-slots", default="",
                   help="comma-separated pool sizes for the stand-in rows (default: the "
                   "runtime's, top-k x 1)")
    p.add_argument("--quant-everywhere", choices=["", "int8", "int4"], default="",
                   help="also a row with every expert quantized (--quant)")
    p.add_argument("--fp8-model", action="append", default=[], metavar="DIR",
                   help="also rows for this FP8 copy of --model (moe-serve convert; "
                   "repeatable): its experts FP8 in their slots (--quant fp8), and, for the "
                   "first, widened at read (none)")
    p.add_argument("--kv-int8", action="store_true",
                   help="also a row with an int8 KV cache (--kv-cache-dtype int8: more expert "
                   "slots in the same budget)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--max-context", type=int, default=None,
                   help="KV-cache tokens reserved (default: what the prompts and answers "
                   "need; a server reserves its whole context)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    codec = TextCodec(a.model)
    prompts = [codec.encode(t) for t in prompt_texts(a.prompts)]
    variants = {"exact": {}}
    variants.update({f"skip below {float(w):g}": {"skip_miss_weight": float(w)}
                     for w in a.weights.split(",") if w})
    pools = [int(n) for n in a.stand_in_slots.split(",") if n] or [None]
    variants.update({f"{a.stand_in_quant} stand-ins below {float(w):g}"
                     + ("" if n is None else f", {n} slots"): {
                         "miss_quant": a.stand_in_quant, "miss_quant_weight": float(w),
                         "miss_quant_slots": n}
                     for w in a.stand_in_weights.split(",") if w for n in pools})
    if a.quant_everywhere:
        variants[f"every expert {a.quant_everywhere}"] = {"quant": a.quant_everywhere}
    if a.kv_int8:
        variants["int8 KV cache"] = {"kv_cache_dtype": "int8"}
    for n, fp8 in enumerate(a.fp8_model):
        variants[f"FP8 copy {fp8}, FP8 slots"] = {"model": fp8, "quant": "fp8"}
        if n == 0:
            variants[f"FP8 copy {fp8}, widened at read"] = {"model": fp8, "quant": "none"}
    runs: dict[str, dict] = {}
    for label, kw in variants.items():
        need = max(map(len, prompts)) + a.new_tokens + 8
        cfg = ServeConfig(**{"model": a.model, "device": a.device,
                             "memory_budget": a.memory_budget,
                             "max_context": max(need, a.max_context or 0), **kw})
        model = OffloadedModel(cfg)
        generate(model, [prompts[0][:4]], 2)  # warm-up
        print(f"{label}:", file=sys.stderr, flush=True)
        runs[label] = run(model, prompts, a.new_tokens, runs.get("exact"))
        runs[label]["slots"] = f"{model.n_slots}/{model.store.total_experts}"
        device = model.device
        del model
    base = runs["exact"]
    rows = []
    for label, r in runs.items():
        kept = [_kept_prefix(x, y) for x, y in zip(r["tokens"], base["tokens"], strict=True)]
        ref, got = torch.cat(base["logp"]), torch.cat(r["logp"])
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
        rows.append([label, r["slots"], f"{r['skipped'] / r['new']:.2f}",
                     f"{r['low'] / r['new']:.2f}", f"{r['bytes'] / r['new'] / 2**20:.3f}",
                     f"{r['new'] / r['s']:.1f}", f"{base['s'] / r['s']:.2f}",
                     f"{sum(kept) / len(kept):.1f} / {a.new_tokens}", f"{agree:.3f}",
                     f"{kl:.4f}"])
    table = markdown_table(["serving", "expert slots", "experts skipped / token",
                            "stand-ins / token",
                            "expert MiB moved / token", "tokens / s", "speed-up",
                            "greedy tokens kept before the first difference (mean)",
                            "teacher-forced argmax agreement", "teacher-forced KL (nats)"],
                           rows)
    body = (f"Model: {a.model}; {len(prompts)} prompts ({a.prompts or 'code prompts'}), "
            f"{a.new_tokens} greedy tokens each, one prompt at a time; memory budget "
            f"{a.memory_budget or 'default (90% of free)'}, cross-layer prefetch. Tokens / s: "
            "new tokens over the time of the whole generate call (prefill included). "
            f"Teacher forcing feeds the exact answers back a token a step.\n\n{table}\n")
    print(body)
    append_results(a.out, "Light missing experts: skipped, stood in for, or every expert "
                   "quantized (bench/serve_skip.py)",
                   command_line("bench.serve_skip", argv), torch.device(device), body)


if __name__ == "__main__":
    main()
