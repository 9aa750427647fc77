"""Drafts for speculation by prompt lookup (serve.generate.DecodeBatch, ServeConfig.speculate):
the tokens that followed an earlier occurrence of the answer's last few in the prompt and
answer so far. No draft model: answers that restate their context (code written again,
quotes, fields copied out) get whole runs of tokens verified in one forward."""

from __future__ import annotations

from collections.abc import Sequence


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
