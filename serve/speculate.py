"""Speculation (serve.generate.DecodeBatch, ServeConfig.speculate): drafts by prompt lookup,
the tokens that followed an earlier occurrence of the answer's last few in the prompt and
answer so far (answers that restate their context, code written again, quotes, fields
copied out, get whole runs of tokens verified in one forward), from a predicted answer a
request gives (OpenAI's predicted outputs), or from a draft model (serve/draft.py). `judge`
keeps what a row would have drawn: for greedy rows the drafts that are the argmax, for
sampled rows speculative sampling (Leviathan et al.), against the draft model's
distribution when it drew the draft, else a point-mass draft; the same distribution as
drawing one token a step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# most tokens a row drafts a step from a predicted answer (beside speculate's own K)
PREDICTED_DRAFT = 8


@dataclass
class Drafted:
    """A row's draft for a step: its tokens; when a draft model drew them (a sampled row),
    the distribution [V] each was drawn from (None: certain of them, as taken greedily or
    looked up); whether they came from the row's predicted answer."""

    tokens: list[int]
    q: list[torch.Tensor] | None = None
    predicted: bool = False


@dataclass
class DraftAsk:
    """A row's request for drafts in a step: its KV-cache row, its context (prompt and answer
    so far), the most tokens it takes, and for a sampled row its sampling (a
    serve.sampling.SamplingConfig with a temperature; None: greedy) and generator."""

    row: int
    context: Sequence[int]
    k: int
    sampling: object = None
    gen: torch.Generator | None = None


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


def predicted(prediction: Sequence[int], answer: Sequence[int], k: int, n: int = 3
              ) -> list[int]:
    """Drafts from a predicted answer (SamplingConfig.prediction): the (up to) k tokens that
    follow the answer so far in it while the answer is its start; after they part, those
    that follow the occurrence of the answer's last n tokens in it nearest the answer's own
    length (an edit shifts the rest a little) -> [] where there is none."""
    m = len(answer)
    if list(prediction[:m]) == list(answer):
        return list(prediction[m:m + k])
    if m < n:
        return []
    tail = list(answer[-n:])
    ends = [i + n for i in range(len(prediction) - n + 1)
            if list(prediction[i:i + n]) == tail and i + n < len(prediction)]
    if not ends:
        return []
    end = min(ends, key=lambda e: abs(e - m))
    return list(prediction[end:end + k])


def next_length(most: int, length: int, drafted: int, kept: int) -> int:
    """How many tokens a row may draft next (at most `most`), having been allowed `length`
    and kept `kept` of the `drafted` it drafted: one more when all were kept, else one more
    than were kept (a row whose drafts miss drafts few, so that their rejected experts cost
    little; one whose drafts hold drafts more)."""
    return min(most, length + 1 if kept == drafted else kept + 1)


def judge(probs: torch.Tensor | None, logits: torch.Tensor, draft: int | None,
          gen: torch.Generator | None, q: torch.Tensor | None = None) -> tuple[bool, int]:
    """One position of a verified draft: logits [V] the model's there (as the row samples
    from them), probs its distribution (None: greedy), draft the token drafted there (None:
    past the drafts), q [V] the distribution the draft was drawn from (None: a draft
    certain of its token) -> (whether the draft is kept, the token taken). Greedy keeps the
    draft if it is the argmax, else takes the argmax. Sampled keeps draft x with
    probability min(1, p(x) / q(x)) (p(x) for a certain draft) and at a rejection draws
    from max(0, p - q) renormalized (p without x for a certain draft); past the drafts it
    draws from p. Either way the token is distributed as drawing one a step would give."""
    if probs is None:
        best = int(logits.argmax())
        return best == draft, best
    if draft is None:
        return False, int(torch.multinomial(probs, 1, generator=gen))
    keep = probs[draft] if q is None else (probs[draft] / q[draft]).clamp(max=1.0)
    if torch.rand((), generator=gen, device=probs.device) < keep:
        return True, draft
    if q is None:
        rest = probs.clone()
        rest[draft] = 0
    else:
        rest = (probs - q).clamp(min=0)
    if not rest.sum() > 0:  # p = q up to rounding: any draw from p will do
        rest = probs
    return False, int(torch.multinomial(rest / rest.sum(), 1, generator=gen))
