"""Drafts for speculation by prompt lookup (serve.generate.DecodeBatch, ServeConfig.speculate):
the tokens that followed an earlier occurrence of the answer's last few in the prompt and
answer so far. No draft model: answers that restate their context (code written again,
quotes, fields copied out) get whole runs of tokens verified in one forward. `accept` keeps
what a row would have drawn: for greedy rows the drafts that are the argmax, for sampled
rows speculative sampling with a point-mass draft (the same distribution as drawing one
token a step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lookup(context: Sequence[int], k: int, n: int = 3) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the
    last n tokens of context -> [] where there is none. Shorter matches draft more and are
    right less often: a draft the model rejects still costs its experts' bytes."""
    end = len(context)
    if end <= n:
        return []
    tail, last = list(context[end - n:]), context[-1]
    for stop in range(end - 2, n - 2, -1):  # where an earlier occurrence would end
        if context[stop] == last and list(context[stop - n + 1:stop + 1]) == tail:
            return list(context[stop + 1:stop + 1 + k])
    return []


def accept(probs: torch.Tensor | None, logits: torch.Tensor, draft: list[int],
           gen: torch.Generator | None) -> list[int]:
    """The tokens a row takes after verifying its draft: logits [len(draft) + 1, V] are the
    model's after each of its last token and drafts; probs the distributions it samples
    from there (None: greedy). Greedy: the drafts up to the first that is not the argmax,
    then the argmax there. Sampled: draft x is kept with probability p(x) (a draft is
    certain of its token: min(1, p / q) = p), and at the first rejection a token is drawn
    from p without x, renormalized; after every draft kept, one more is drawn. Either way
    the tokens are distributed as drawing one a step would give."""
    if probs is None:
        best = logits.argmax(-1).tolist()
        a = next((s for s, t in enumerate(draft) if best[s] != t), len(draft))
        return draft[:a] + [best[a]]
    for s, x in enumerate(draft):
        p = probs[s]
        if torch.rand((), generator=gen, device=p.device) < p[x]:
            continue
        rest = p.clone()
        rest[x] = 0
        return draft[:s] + [int(torch.multinomial(rest / rest.sum(), 1, generator=gen))]
    return draft + [int(torch.multinomial(probs[len(draft)], 1, generator=gen))]
