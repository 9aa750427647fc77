"""`python -m train.sample CHECKPOINT [--prompt TEXT]`: a few lines from a trained checkpoint.

A plain full-context sampler for the demo; the offloading runtime with a KV cache is serve/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe import MoETransformer
from parallel import parallelize
from train import checkpoint
from train.export import find_tokenizer


@torch.no_grad()
def sample(model: MoETransformer, ids: list[int], new_tokens: int, temperature: float,
           top_k: int, gen: torch.Generator) -> list[int]:
    """Append new_tokens tokens to ids (temperature 0: greedy)."""
    out = list(ids)
    for _ in range(new_tokens):
        ctx = torch.tensor([out[-model.cfg.max_seq_len:]])
        logits = model(ctx).logits[0, -1].float()
        if temperature <= 0:
            out.append(int(logits.argmax()))
            continue
        vals, idx = logits.topk(min(top_k, logits.numel()))
        probs = torch.softmax(vals / temperature, dim=-1)
        out.append(int(idx[torch.multinomial(probs, 1, generator=gen)]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a step_* folder, checkpoints/ or a run dir")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from tokenizers import Tokenizer

    ckpt = checkpoint.resolve(a.checkpoint)
    if ckpt is None:
        sys.exit(f"error: {a.checkpoint} is not a checkpoint (no model_config.json)")
    tok_file = find_tokenizer(ckpt)
    if tok_file is None:
        sys.exit(f"error: no tokenizer.json beside {ckpt}")
    tok = Tokenizer.from_file(str(tok_file))
    model = MoETransformer(checkpoint.model_config(ckpt))
    checkpoint.load(ckpt, parallelize(model, None), load_optimizer=False)
    model.eval()
    gen = torch.Generator().manual_seed(a.seed)
    for prompt in a.prompt or ["def ", "import os\n", "class "]:
        ids = sample(model, tok.encode(prompt).ids, a.new_tokens, a.temperature, a.top_k, gen)
        print(f"--- prompt {prompt!r}\n{tok.decode(ids)}\n")


if __name__ == "__main__":
    main()
