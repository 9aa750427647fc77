"""Speculation on a served model, by prompt lookup or with a draft model (--draft-model
DIR): answers to prompts whose answers repeat their context (code written again, a quote, a
field copied out), decoded one token a step and with up to K drafted tokens a step
(--speculate K). Same model, same budget, same prompts; greedy answers must be the same
tokens (sampled ones, --temperature T with fixed seeds, only the same distribution). Reports
steps per token, the drafts kept, expert bytes moved per token and decode speed, side by
side. --batch N answers N prompts at a time, so a draft model drafts for N rows in each of
its forwards (the table counts them beside the forwards drafting row by row would take).

    make demo && python -m bench.serve_speculate --model runs/demo/hf --memory-budget 8.5MiB
    python -m bench.serve_speculate --model DIR --prompts prompts.txt --speculate 2,4,8
    python -m bench.serve_speculate --model DIR --draft-model SMALL_DIR --speculate 2,4
    python -m bench.serve_speculate --model DIR --draft-model SMALL_DIR --batch 4

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
from serve.draft import draft_nbytes
from serve.generate import generate
from serve.runtime import OffloadedModel, resolve_device, resolve_dtype
from serve.sampling import SamplingConfig
from serve.text import TextCodec
from serve.units import parse_size

PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return",
    "import os\nimport sys\n\n\ndef main():\n    print(sys.argv)\n\n\nimport os\nimport sys\n"
    "\n\ndef main():\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\n"
    "class Point:\n    def __init__(self, x, y):\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\nfor i in range(10):\n",
]


def prompt_texts(path: str | None) -> list[str]:
    """The prompts of a file, separated by lines holding only "---" (None: PROMPTS)."""
    if path is None:
        return PROMPTS
    return [t.strip("\n") for t in Path(path).read_text().split("\n---\n") if t.strip()]


def run(model: OffloadedModel, prompts: list[list[int]], new_tokens: int,
        temperature: float = 0.0, predictions: list[list[int]] | None = None,
        batch: int = 1) -> dict:
    """Answers (greedy, or sampled with seed i for prompt i; predictions: each prompt's
    predicted answer, with batch 1), `batch` prompts at a time -> tokens, steps, drafts,
    bytes, skipped experts, low-precision stand-ins, seconds, and the draft model's
    forwards (batched, and row by row) where it has one."""
    if predictions is not None and batch != 1:
        raise ValueError("predictions are given one prompt at a time (batch 1)")
    out = {"tokens": [], "steps": 0, "new": 0, "drafted": 0, "accepted": 0, "bytes": 0,
           "skipped": 0, "low": 0, "s": 0.0}
    drafter = model.drafter
    forwards = (drafter.forwards, drafter.row_forwards) if drafter is not None else None
    for i in range(0, len(prompts), batch):
        pred = None if predictions is None else tuple(predictions[i])
        model.synchronize()
        t0 = time.perf_counter()
        res = generate(model, prompts[i:i + batch], new_tokens,
                       SamplingConfig(temperature=temperature, seed=i, prediction=pred))
        model.synchronize()
        st = res.stats
        out["s"] += time.perf_counter() - t0
        out["tokens"] += res.token_ids
        out["steps"] += st["steps"]
        out["new"] += st["new_tokens"]
        out["drafted"] += st["drafted_tokens"]
        out["accepted"] += st["accepted_tokens"]
        out["bytes"] += st["bytes_to_device"]
        out["skipped"] += st["experts_skipped"]
        out["low"] += st["experts_low_precision"]
    if forwards is not None:
        out["draft_forwards"] = (drafter.forwards - forwards[0],
                                 drafter.row_forwards - forwards[1])
    return out


def edited(answer: list[int], vocab: int, n: int = 3) -> list[int]:
    """answer with n tokens a third of the way in changed (a small edit the prediction
    misses)."""
    at = len(answer) // 3
    return answer[:at] + [(t + 1) % vocab for t in answer[at:at + n]] + answer[at + n:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a served model directory (with tokenizer)")
    p.add_argument("--prompts", default=None, help='prompts separated by "---" lines')
    p.add_argument("--speculate", default="2,4,8", help="comma-separated K to compare with 0")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="draft with this causal LM (sharing the model's tokenizer) instead of "
                   "prompt lookup; the model's own directory gives the ceiling, every draft "
                   "kept")
    p.add_argument("--draft-min-prob", type=float, default=0.4,
                   help="a draft stops before a token the draft model gives less than P")
    p.add_argument("--draft-beside", action="store_true",
                   help="the draft's weights and KV cache come on top of --memory-budget, so "
                   "every row has the same expert slots (a 0.6B draft beside a 30B MoE is 2%% "
                   "of its bytes; the tiny demo's draft is a third of them)")
    p.add_argument("--predict", action="store_true",
                   help="also answer with each greedy answer given as the request's predicted "
                   "output (OpenAI's \"prediction\"), whole and with 3 tokens edited, "
                   "speculate off")
    p.add_argument("--batch", type=int, default=1,
                   help="prompts answered at a time (the model's max_batch)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (the same tokens checked); > 0: sampled, seeded")
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    if a.batch < 1 or a.predict and a.batch != 1:
        p.error("--batch must be >= 1, and 1 with --predict (a prediction is per prompt)")
    texts = prompt_texts(a.prompts)
    codec = TextCodec(a.model)
    prompts = [codec.encode(t) for t in texts]
    ks = [0] + [int(k) for k in a.speculate.split(",") if k]
    runs: dict[str, dict] = {}
    context = max(map(len, prompts)) + a.new_tokens + 8
    for k in ks:
        budget = a.memory_budget
        draft = a.draft_model if k else None
        if draft and a.draft_beside and budget is not None:  # the draft's bytes on top
            dtype = resolve_dtype("auto", resolve_device(a.device))
            budget = parse_size(budget) + draft_nbytes(draft, dtype, a.batch, context)
        cfg = ServeConfig(model=a.model, device=a.device, memory_budget=budget,
                          max_context=context, speculate=k, draft_model=draft,
                          draft_min_prob=a.draft_min_prob, max_batch=a.batch)
        model = OffloadedModel(cfg)
        generate(model, [prompts[0][:4]], 2)  # warm-up
        print(f"speculate {k}:", file=sys.stderr, flush=True)
        runs[str(k)] = run(model, prompts, a.new_tokens, a.temperature, batch=a.batch)
        runs[str(k)]["slots"] = slots = f"{model.n_slots}/{model.store.total_experts}"
        device = model.device
        if k == 0 and a.predict:  # the answers themselves as predictions, whole and edited
            answers, vocab = runs["0"]["tokens"], model.cfg.vocab_size
            for label, preds in (("0, the answer predicted", answers),
                                 ("0, the answer predicted, 3 tokens edited",
                                  [edited(t, vocab) for t in answers])):
                print(f"{label}:", file=sys.stderr, flush=True)
                runs[label] = dict(run(model, prompts, a.new_tokens, a.temperature, preds),
                                   slots=slots)
        del model
    base = runs["0"]
    rows = []
    for k, r in runs.items():
        same = "yes" if r["tokens"] == base["tokens"] else "NO"
        rows.append([k, r["slots"], same if a.temperature == 0 else "n/a (sampled)",
                     f"{r['steps'] / r['new']:.2f}", f"{r['accepted']}/{r['drafted']}",
                     f"{r['bytes'] / r['new'] / 2**20:.3f}", f"{r['new'] / r['s']:.1f}",
                     f"{base['s'] / r['s']:.2f}"])
        if a.draft_model is not None:  # the draft's forwards, and drafting row by row's
            fw = r.get("draft_forwards")
            rows[-1].insert(5, f"{fw[0]} ({fw[1]})" if fw else "-")
    head = ["speculate K", "expert slots", "same tokens as K=0", "steps / token",
            "drafts kept", "expert MiB moved / token", "tokens / s", "speed-up"]
    if a.draft_model is not None:
        head.insert(5, "draft forwards (row by row)")
    table = markdown_table(head, rows)
    how = "greedy" if a.temperature == 0 else f"sampled at temperature {a.temperature:g}"
    drafts = ("prompt lookup of the last 3 tokens" if a.draft_model is None else
              f"drafts by the draft model {a.draft_model} (greedy, stopping before a token it "
              f"gives less than {a.draft_min_prob:g}; loaded whole on the device, "
              + ("its bytes on top of the budget)" if a.draft_beside else "within the budget)"))
    at_a_time = "one prompt at a time" if a.batch == 1 else f"{a.batch} prompts at a time"
    body = (f"Model: {a.model}; {len(prompts)} prompts whose answers restate their context, "
            f"{a.new_tokens} tokens each ({how}), {at_a_time}; memory budget "
            f"{a.memory_budget or 'default (90% of free)'}; {drafts}. Tokens / s: new tokens "
            f"over the time of the whole generate call (prefill included).\n\n{table}\n")
    if a.predict:
        body = body.replace("\n\n|", " Predicted rows: speculate 0, each prompt's greedy answer "
                            "given as its prediction (up to 8 drafts a step).\n\n|", 1)
    print(body)
    title = "prompt lookup" if a.draft_model is None else "a draft model"
    append_results(a.out, f"Speculation by {title} (bench/serve_speculate.py)",
                   command_line("bench.serve_speculate", argv), torch.device(device), body)


if __name__ == "__main__":
    main()
