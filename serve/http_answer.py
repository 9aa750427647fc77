"""The answer documents of OpenAI completions and chat requests, from the requests a `Batcher`
ran: a whole answer (`answer`), or server-sent events as tokens come (`Stream`): choices with
their text, a chat answer's reasoning_content and tool_calls, log-probabilities (an echoed
prompt's first), best_of's pick, and the usage."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import accumulate

from serve.batcher import Batcher, Request
from serve.http_params import Params, forced_calls
from serve.sampling import seeded_rows
from serve.session import Session


@dataclass
class Job:
    """One completions (chat=False) or chat request: its prompts (ids; texts: as given, for
    echo), what it asks, and its id, time and model (every document's head)."""

    session: Session
    prompts: list[list[int]]
    chat: bool
    ask: Params
    texts: list[str | None] = field(default_factory=list)
    head: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts = self.texts or [None] * len(self.prompts)
        self.head = self.head or {
            "id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": self.session.name}

    def prompt_text(self, p: int) -> str:
        """Prompt p as echoed: as given, else decoded (ids as text without a tokenizer)."""
        codec = self.session.codec
        if self.texts[p] is not None:
            return self.texts[p]
        return codec.decode(self.prompts[p]) if codec else " ".join(map(str, self.prompts[p]))

    def request(self, p: int, sampling, **hooks) -> Request:
        """The Batcher request of prompt p with one choice's sampling (max_tokens 0, echo
        only, reads the prompt and draws one token that is dropped; None: up to the
        context)."""
        a, prompt = self.ask, self.prompts[p]
        room = self.session.model.max_context - len(prompt)
        return Request(prompt, max(1, room if a.max_tokens is None else a.max_tokens),
                       sampling, a.stop, channels=self.chat, **hooks)


def answer(job: Job, batcher: Batcher) -> dict:
    """Run job's requests (n choices of each prompt, or best_of candidates of which the n
    of the highest mean log-probability per token are kept, as OpenAI ranks them) -> the
    answer document."""
    a, chat = job.ask, job.chat
    configs = seeded_rows(a.sampling, a.n) if a.best_of == a.n else seeded_rows(
        replace(a.sampling, logprobs=a.sampling.logprobs or 0), a.best_of)
    jobs = [(p, c) for p in range(len(job.prompts)) for c in configs]
    reqs = batcher.run_all([job.request(p, c) for p, c in jobs])
    kept = list(zip(reqs, (p for p, _ in jobs), strict=True))
    if a.best_of > a.n:
        kept = [x for p in range(len(job.prompts))
                for x in _best(kept[p * a.best_of:(p + 1) * a.best_of], a.n,
                               a.sampling.logprobs is None)]
    choices = [_choice(job, i, r, p) for i, (r, p) in enumerate(kept)]
    new = sum(len(r.completion.token_ids) for r in reqs)
    stats = reqs[0].stats if len(reqs) == 1 else [r.stats for r in reqs]
    return dict(job.head, object="chat.completion" if chat else "text_completion",
                choices=choices, stats=stats,
                usage=_usage(job.prompts, reqs[::a.best_of], new, reqs))


def _choice(job: Job, i: int, r: Request, p: int) -> dict:
    """Choice i of a whole answer: request r's completion of prompt p."""
    a, o = job.ask, r.completion
    if a.max_tokens == 0:  # echo only: the token drawn is dropped
        o = replace(o, token_ids=[], text="" if o.text is not None else None,
                    finish_reason="length", logprobs=[] if o.logprobs is not None else None)
        r.completion = o
    text = o.text if o.text is not None else " ".join(map(str, o.token_ids))
    lp = None if o.logprobs is None else _logprob_doc(
        job.session, job.prompts[p] + o.token_ids if a.echo else o.token_ids,
        o.prompt_logprobs + o.logprobs if a.echo else o.logprobs, job.chat)
    if not job.chat:
        if a.echo:
            text = job.prompt_text(p) + text
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
    message = {"role": "assistant", "content": text}
    if o.reasoning:
        message["reasoning_content"] = o.reasoning
    finish = o.finish_reason
    forced = _forced(a, o.text)  # then the text is the calls' JSON
    if forced or o.tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in forced or o.tool_calls]
        message["content"] = None if forced else text or None
        finish = "tool_calls"
    return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish}


class Stream:
    """A job answered as server-sent events, each choice's text, reasoning, tool calls and
    log-probabilities as its tokens come. Its requests are submitted at once (a prompt the
    batcher refuses raises here, before any event); `run` then sends the events through
    `send` (a dict as JSON, or "[DONE]") until every choice has ended."""

    def __init__(self, job: Job, batcher: Batcher, send: Callable[[dict | str], None]):
        self.job, self.send = job, send
        a = job.ask
        configs = seeded_rows(a.sampling, a.n)
        # choice i: prompt of[i] with configs[i % n] (n choices each, numbered prompt by
        # prompt)
        self.of = [p for p in range(len(job.prompts)) for _ in configs]
        self.want_lp = a.sampling.logprobs is not None
        # one queue per choice of (kind, item): "content" or "reasoning_content" (text),
        # "tool_calls" (a call), "logprob" ((id, entry): before its token's text), "prompt"
        # (the prompt's entries, echo: before the first new token's)
        self.items: list[queue.Queue[tuple[str, object]]] = [queue.Queue() for _ in self.of]
        self.reqs = [batcher.submit(job.request(self.of[i], configs[i % a.n], **self._hooks(q)))
                     for i, q in enumerate(self.items)]
        self.calls = [0] * len(self.of)  # tool calls streamed per choice
        self.pending: list[list[tuple[int, object]]] = [[] for _ in self.of]  # logprobs unsent
        self.offsets = [0] * len(self.of)  # completions: where a choice's next text starts
        self.obj = "chat.completion.chunk" if job.chat else "text_completion"

    def _hooks(self, q: queue.Queue) -> dict:
        want_lp, echo = self.want_lp, self.job.ask.echo
        return dict(
            on_text=lambda t: q.put(("content", t)),
            on_reasoning=lambda t: q.put(("reasoning_content", t)),
            on_tool_call=lambda t: q.put(("tool_calls", t)),
            on_logprob=(lambda t, e: q.put(("logprob", (t, e)))) if want_lp else None,
            on_prompt_logprobs=(lambda es: q.put(("prompt", es)))
            if echo and want_lp else None)

    def run(self) -> None:
        """Send every choice's events, then the usage (when asked) and "[DONE]"; a client
        that goes away (OSError) ends the rows at their next token."""
        job, a = self.job, self.job.ask
        try:
            for i in range(len(self.of)):
                if job.chat:
                    self._event(i, None, None, first=True)
                elif a.echo and not self.want_lp:
                    self._echo_prompt(i, None)
            finished = [False] * len(self.of)
            while not all(finished):
                idle = True
                for i, r in enumerate(self.reqs):
                    if finished[i]:
                        continue
                    done = r.done.is_set()  # then all its text is already queued
                    idle = not self._drain(i) and idle
                    if done:
                        finished[i] = True
                        self._end(i, r)
                if idle:
                    time.sleep(0.02)
            if a.include_usage and all(r.error is None for r in self.reqs):
                new = 0 if a.max_tokens == 0 else sum(len(r.completion.token_ids)
                                                      for r in self.reqs)
                self.send(dict(job.head, object=self.obj, choices=[],
                               usage=_usage(job.prompts, self.reqs[::a.n], new,
                                            self.reqs)))
            self.send("[DONE]")
        except OSError:  # the client went away: its rows end at the next token
            for r in self.reqs:
                r.cancelled = True

    def _drain(self, i: int) -> bool:
        """Send what choice i has queued -> whether there was anything."""
        got = False
        while not self.items[i].empty():
            key, item = self.items[i].get()
            got = True
            if key == "prompt":
                self._echo_prompt(i, item)
            elif self.job.ask.max_tokens == 0:  # echo only: the token drawn is dropped
                continue
            elif key == "logprob":
                self.pending[i].append(item)
            elif key == "content" and self.job.ask.forced_call is not None:
                continue  # a forced call: sent once whole, from the completion (_end)
            else:
                self._send_item(i, key, item)
        return got

    def _send_item(self, i: int, key: str, item) -> None:
        if key == "tool_calls":
            item, self.calls[i] = [_tool_call(item, self.calls[i])], self.calls[i] + 1
        self._event(i, item, None, key=key)

    def _end(self, i: int, r: Request) -> None:
        """Choice i has ended: its last event, or an error event (the status line has gone)."""
        if r.error is not None:
            self.send({"error": {"message": f"{type(r.error).__name__}: {r.error}",
                                 "type": "server_error", "code": 500}})
            return
        o = r.completion
        forced = _forced(self.job.ask, o.text)
        for item in forced or ([o.text] if self.job.ask.forced_call is not None and o.text
                               else []):  # a forced answer cut short stays text
            self._send_item(i, "tool_calls" if forced else "content", item)
        self._event(i, None, "length" if self.job.ask.max_tokens == 0 else
                    "tool_calls" if o.tool_calls or forced else o.finish_reason)

    def _logprobs(self, i: int, toks: list[int], entries: list) -> dict | None:
        """The logprobs of choice i's next tokens in a chunk (None: not asked)."""
        if not self.want_lp:
            return None
        doc = _logprob_doc(self.job.session, toks, entries, self.job.chat, self.offsets[i])
        self.offsets[i] += sum(map(len, doc.get("tokens", ())))
        return doc

    def _event(self, i: int, delta_text, finish: str | None, first: bool = False,
               key: str = "content") -> None:
        """A chunk of choice i, with the logprobs of its tokens since the last one."""
        got, self.pending[i] = self.pending[i], []
        lp = None if first else self._logprobs(i, [t for t, _ in got], [e for _, e in got])
        if self.job.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {key: delta_text} if delta_text is not None else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish}
            if self.want_lp:
                choice["logprobs"] = lp
        else:
            choice = {"index": i, "text": delta_text or "", "logprobs": lp,
                      "finish_reason": finish}
        self.send(dict(self.job.head, object=self.obj, choices=[choice]))

    def _echo_prompt(self, i: int, entries: list | None) -> None:
        """Completions "echo": the prompt first (with its logprobs when asked)."""
        p = self.of[i]
        self.send(dict(self.job.head, object=self.obj, choices=[{
            "index": i, "text": self.job.prompt_text(p),
            "logprobs": self._logprobs(i, self.job.prompts[p], entries),
            "finish_reason": None}]))


def _forced(a: Params, text: str | None) -> list[dict] | None:
    """The tool calls of an answer that tool_choice forced (None: not forced, or cut short
    before its JSON was whole: then it stays text)."""
    if a.forced_call is None or text is None:
        return None
    return forced_calls(a.forced_call, text)


def _tool_call(call: dict, index: int | None = None) -> dict:
    """{"name", "arguments"} -> an OpenAI tool call (with its index in a stream delta)."""
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    return out if index is None else dict(out, index=index)


def _logprob_doc(session: Session, ids: list[int], logprobs: list, chat: bool,
                 offset: int = 0) -> dict:
    """The new tokens' log-probabilities in OpenAI's form: chat {"content": [{"token",
    "logprob", "bytes", "top_logprobs"}]}; completions {"tokens", "token_logprobs",
    "top_logprobs", "text_offset"} (offset: where the first token's text starts). Every new
    token counts, a final stop token too."""
    codec = session.codec

    def text(t: int) -> str:
        return codec.tok.decode([t], skip_special_tokens=False) if codec else str(t)

    def entry(t: int, lp: float) -> dict:
        s = text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    if chat:
        return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, alp) for a, alp in alts])
                            for t, (lp, alts) in zip(ids, logprobs, strict=True)]}
    def top(alts) -> dict:  # keyed by text: of alternatives that decode alike, the likeliest
        d: dict[str, float] = {}
        for a, alp in alts:
            d.setdefault(text(a), alp)
        return d

    tokens = [text(t) for t in ids]
    offsets = list(accumulate((len(x) for x in tokens[:-1]), initial=offset)) if tokens else []
    return {"tokens": tokens,  # an echoed prompt's first token has no log-probability
            "token_logprobs": [None if e is None else e[0] for e in logprobs],
            "top_logprobs": [None if e is None else top(e[1]) for e in logprobs],
            "text_offset": offsets}


def _best(cands: list[tuple[Request, int]], n: int, drop_logprobs: bool
          ) -> list[tuple[Request, int]]:
    """The n candidates (request, prompt index) of the highest mean log-probability per new
    token, best first; drop_logprobs: the client did not ask for them (ranking did)."""
    def mean(r: Request) -> float:
        lps = [lp for lp, _ in r.completion.logprobs]
        return sum(lps) / len(lps) if lps else 0.0

    best = sorted(cands, key=lambda x: mean(x[0]), reverse=True)[:n]
    if drop_logprobs:
        for r, _ in best:
            r.completion = replace(r.completion, logprobs=None)
    return best


def _usage(prompts: list[list[int]], firsts: list[Request], new: int,
           reqs: list[Request]) -> dict:
    """OpenAI's usage: prompt tokens counted once per prompt (firsts: its first choice's
    request), with those its KV-cache row held already (not read again) as cached_tokens;
    with a "prediction", the drafts from it that every request (reqs) kept and rejected."""
    read = sum(map(len, prompts))
    usage = {"prompt_tokens": read, "completion_tokens": new, "total_tokens": read + new,
             "prompt_tokens_details": {"cached_tokens": sum(r.stats["cached_tokens"]
                                                            for r in firsts)}}
    if reqs and reqs[0].sampling.prediction is not None:
        usage["completion_tokens_details"] = {
            f"{kind}_prediction_tokens": sum(r.stats[f"prediction_{kind}_tokens"]
                                             for r in reqs) for kind in ("accepted", "rejected")}
    return usage
