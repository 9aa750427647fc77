"""Speculation by prompt lookup on a served model: answers to prompts whose answers repeat
their context (code written again, a quote, a field copied out), decoded one token a step
and with up to K drafted tokens a step (--speculate K). Same model, same budget, same
prompts; greedy answers must be the same tokens (sampled ones, --temperature T with fixed
seeds, only the same distribution). Reports steps per token, the drafts kept, expert bytes
moved per token and decode speed, side by side.

    make demo && python -m bench.serve_speculate --model runs/demo/hf --memory-budget 8.5MiB
    python -m bench.serve_speculate --model DIR --prompts prompts.txt --speculate 2,4,8

Random weights make answers that rarely repeat anything: use a trained model. --prompts: a
file of prompts separated by lines holding only "---" (default: a few code prompts that
restate what came before).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import append_results, command_line, markdown_table
from serve.config import ServeConfig
from serve.generate import generate
from serve.runtime import OffloadedModel
from serve.sampling import SamplingConfig
from serve.text import TextCodec

PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return",
    "import os\nimport sys\n\n\ndef main():\n    print(sys.argv)\n\n\nimport os\nimport sys\n"
    "\n\ndef main():\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\n"
    "class Point:\n    def __init__(self, x, y):\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\nfor i in range(10):\n",
]


def run(model: OffloadedModel, prompts: list[list[int]], new_tokens: int,
        temperature: float = 0.0) -> dict:
    """Answers (greedy, or sampled with seed i for prompt i), one prompt at a time ->
    tokens, steps, drafts, bytes, seconds."""
    out = {"tokens": [], "steps": 0, "new": 0, "drafted": 0, "accepted": 0, "bytes": 0,
           "s": 0.0}
    for i, p in enumerate(prompts):
        model.synchronize()
        t0 = time.perf_counter()
        res = generate(model, [p], new_tokens, SamplingConfig(temperature=temperature, seed=i))
        model.synchronize()
        st = res.stats
        out["s"] += time.perf_counter() - t0
        out["tokens"].append(res.token_ids[0])
        out["steps"] += st["steps"]
        out["new"] += st["new_tokens"]
        out["drafted"] += st["drafted_tokens"]
        out["accepted"] += st["accepted_tokens"]
        out["bytes"] += st["bytes_to_device"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a served model directory (with tokenizer)")
    p.add_argument("--prompts", default=None, help='prompts separated by "---" lines')
    p.add_argument("--speculate", default="2,4,8", help="comma-separated K to compare with 0")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (the same tokens checked); > 0: sampled, seeded")
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    texts = PROMPTS if a.prompts is None else [
        t.strip("\n") for t in Path(a.prompts).read_text().split("\n---\n") if t.strip()]
    codec = TextCodec(a.model)
    prompts = [codec.encode(t) for t in texts]
    ks = [0] + [int(k) for k in a.speculate.split(",") if k]
    runs = {}
    for k in ks:
        cfg = ServeConfig(model=a.model, device=a.device, memory_budget=a.memory_budget,
                          max_context=max(map(len, prompts)) + a.new_tokens + 8, speculate=k)
        model = OffloadedModel(cfg)
        generate(model, [prompts[0][:4]], 2)  # warm-up
        print(f"speculate {k}:", file=sys.stderr, flush=True)
        runs[k] = run(model, prompts, a.new_tokens, a.temperature)
        device = model.device
        del model
    base = runs[0]
    rows = []
    for k, r in runs.items():
        same = "yes" if r["tokens"] == base["tokens"] else "NO"
        rows.append([str(k), same if a.temperature == 0 else "n/a (sampled)",
                     f"{r['steps'] / r['new']:.2f}", f"{r['accepted']}/{r['drafted']}",
                     f"{r['bytes'] / r['new'] / 2**20:.3f}", f"{r['new'] / r['s']:.1f}",
                     f"{base['s'] / r['s']:.2f}"])
    table = markdown_table(["speculate K", "same tokens as K=0", "steps / token",
                            "drafts kept", "expert MiB moved / token", "tokens / s",
                            "speed-up"], rows)
    how = "greedy" if a.temperature == 0 else f"sampled at temperature {a.temperature:g}"
    body = (f"Model: {a.model}; {len(prompts)} prompts whose answers restate their context, "
            f"{a.new_tokens} tokens each ({how}), one prompt at a time; memory budget "
            f"{a.memory_budget or 'default (90% of free)'}; prompt lookup of the last 3 "
            "tokens. Tokens / s: new tokens over the time of the whole generate call "
            f"(prefill included).\n\n{table}\n")
    print(body)
    append_results(a.out, "Speculation by prompt lookup (bench/serve_speculate.py)",
                   command_line("bench.serve_speculate", argv), torch.device(device), body)


if __name__ == "__main__":
    main()
