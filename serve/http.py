"""OpenAI-compatible HTTP server over a `Session`: POST /v1/completions and
/v1/chat/completions (server-sent events when "stream": true), GET /v1/models and /health;
POST /tokenize and /detokenize as vLLM has them.

One model, one device: a `Batcher` runs the requests, continuously batched: one that arrives
while others decode joins them (up to max_batch rows). "n" > 1 asks for n choices, each a
request of its own (with a seed s, choice i draws with s + i). Completions take several
prompts in one request (n choices each, numbered prompt by prompt, streamed too); "echo" and
"logprobs" score prompts and answers (in a stream, each chunk carries the log-probabilities
of its tokens; an echoed prompt comes first).

Chat: "chat_template_kwargs" (an object), "reasoning_effort" and "tools" reach the chat
template (over the server's defaults); a reasoning model's answer comes back split
(serve/answer.py): its reasoning (GPT-OSS's analysis channel, <think>...</think>) as the
message's "reasoning_content", its tool calls as "tool_calls" (finish_reason "tool_calls"),
the rest as "content"; in stream deltas too.

Sampling: temperature, top_p, top_k, seed, presence / frequency / repetition penalties,
logit_bias, min_tokens, ignore_eos, "response_format" (JSON object or JSON schema,
serve/grammar.py), and for completions best_of and "suffix" (fill in the middle, with the
model's FIM tokens).
"""

from __future__ import annotations

import json
import queue
import sys
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate

from serve.batcher import Batcher, Request
from serve.sampling import MAX_LOGPROBS, SamplingConfig, seeded_rows
from serve.session import Session


class BadRequest(ValueError):
    """Answered with HTTP 400 and an OpenAI-style error object."""


def _field(body: dict, name: str, kind, default, check=None):
    v = body.get(name, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be of type {kind.__name__}")
    if check is not None and not check(v):
        raise BadRequest(f"'{name}' has an invalid value {v!r}")
    return v


MAX_N = 16  # most choices one request may ask for


def _tools(body: dict) -> list[dict] | None:
    """The request's function tools for the chat template (None with tool_choice "none")."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise BadRequest("'tools' must be a list of {\"type\": \"function\", \"function\": "
                         "{\"name\": ..., ...}}")
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise BadRequest(f"'tool_choice' {choice!r} is not supported: \"auto\" or \"none\"")
    return tools if choice == "auto" else None


def _tool_call(call: dict, index: int | None = None) -> dict:
    """{"name", "arguments"} -> an OpenAI tool call (with its index in a stream delta)."""
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    return out if index is None else dict(out, index=index)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants logprobs of (None: no logprobs).
    Chat: "logprobs": true with "top_logprobs": N; completions: "logprobs": N."""
    if chat:
        if not _field(body, "logprobs", bool, False):
            if body.get("top_logprobs") not in (None, 0):
                raise BadRequest("'top_logprobs' needs \"logprobs\": true")
            return None
        return _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS)
    v = body.get("logprobs")
    if v is None or v is False:
        return None
    return _field(body, "logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS)


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


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's "logit_bias": {"token id": bias in [-100, 100]} -> {id: bias}."""
    bias = _field(body, "logit_bias", dict, {})
    out = {}
    for k, v in bias.items():
        if not (isinstance(k, str) and k.strip().isdigit()):
            raise BadRequest(f"'logit_bias' keys must be token ids, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise BadRequest(f"'logit_bias' of token {k} must be a number in [-100, 100], "
                             f"got {v!r}")
        out[int(k)] = float(v)
    return out or None


def _params(body: dict, chat: bool
            ) -> tuple[int, SamplingConfig, list[str], bool, int, bool, int]:
    """-> max_tokens, sampling, stop strings, stream, n, echo, best_of."""
    max_tokens = _field(body, "max_tokens", int, 16, lambda v: v >= 0)
    max_tokens = _field(body, "max_completion_tokens", int, max_tokens, lambda v: v >= 0)
    echo = _field(body, "echo", bool, False)
    if echo and chat:
        raise BadRequest("'echo' is a completions field")
    if max_tokens == 0 and not echo:
        raise BadRequest("'max_tokens' must be >= 1 (0 only with \"echo\": true)")
    sampling = SamplingConfig(
        temperature=_field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2),
        top_p=_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0),
        seed=_field(body, "seed", int, None), logprobs=_logprobs(body, chat),
        repetition_penalty=_field(body, "repetition_penalty", float, 1.0, lambda v: v > 0),
        presence_penalty=_field(body, "presence_penalty", float, 0.0, lambda v: -2 <= v <= 2),
        frequency_penalty=_field(body, "frequency_penalty", float, 0.0,
                                 lambda v: -2 <= v <= 2),
        logit_bias=_logit_bias(body), ignore_eos=_field(body, "ignore_eos", bool, False),
        min_tokens=_field(body, "min_tokens", int, 0, lambda v: 0 <= v <= max(max_tokens, 1)))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str)
                                                                 for s in stop)):
        raise BadRequest("'stop' must be a string or a list of strings")
    n = _field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N)
    stream = _field(body, "stream", bool, False)
    best_of = _field(body, "best_of", int, n, lambda v: n <= v <= MAX_N)
    if best_of > n and (chat or stream):
        raise BadRequest("'best_of' > n is a completions field and cannot stream")
    sampling.prompt_logprobs = echo and sampling.logprobs is not None
    return max_tokens, sampling, stop or [], stream, n, echo, best_of


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


def _usage(prompts: list[list[int]], firsts: list[Request], new: int) -> dict:
    """OpenAI's usage: prompt tokens counted once per prompt (firsts: its first choice's
    request), with those its KV-cache row held already (not read again) as cached_tokens."""
    read = sum(map(len, prompts))
    return {"prompt_tokens": read, "completion_tokens": new, "total_tokens": read + new,
            "prompt_tokens_details": {"cached_tokens": sum(r.stats["cached_tokens"]
                                                           for r in firsts)}}


class Handler(BaseHTTPRequestHandler):
    session: Session
    batcher: Batcher
    template_kwargs: dict  # the server's defaults for chat templates
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one line per request on stderr
        sys.stderr.write(f"moe-serve http: {self.address_string()} {fmt % args}\n")

    def _send(self, code: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(code, {"error": {"message": message, "type": kind, "code": code}})

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.session.name, "object": "model", "created": 0,
                 "owned_by": "moe-serve"}]})
        else:
            self._error(404, f"no route GET {self.path}", "not_found")

    def do_POST(self):
        routes = {"/v1/completions": self._completions,
                  "/v1/chat/completions": self._chat,
                  "/tokenize": self._tokenize, "/detokenize": self._detokenize}
        if self.path not in routes:
            self._error(404, f"no route POST {self.path}", "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            routes[self.path](body)
        except json.JSONDecodeError as e:
            self._error(400, f"malformed JSON body: {e}")
        except (BadRequest, ValueError) as e:
            self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 - a server answers, it does not die
            self._error(500, f"{type(e).__name__}: {e}", "server_error")

    # -- endpoints -------------------------------------------------------------------------
    def _completions(self, body: dict) -> None:
        prompt = body.get("prompt")
        # one prompt (text or ids), or several: a list of texts or of id lists
        several = isinstance(prompt, list) and prompt and all(
            isinstance(p, (str, list)) for p in prompt)
        prompts = prompt if several else [prompt]
        if not all(isinstance(p, (str, list)) and p for p in prompts):
            raise BadRequest("'prompt' must be a string, a list of token ids, or a list of "
                             "either (non-empty)")
        suffix = _field(body, "suffix", str, "")
        if suffix:  # fill in the middle: the prompt is the text before, suffix the text after
            if not all(isinstance(p, str) for p in prompts) or body.get("echo"):
                raise BadRequest("'suffix' takes text prompts, without \"echo\"")
            codec = self.session.need_codec()
            ids = [codec.fill_in_middle(p, suffix) for p in prompts]
        else:
            ids = [self.session.encode(p) for p in prompts]
        self._run(body, ids, "text_completion", chat=False,
                  prompt_texts=[p if isinstance(p, str) else None for p in prompts])

    def _tokenize(self, body: dict) -> None:
        """vLLM's /tokenize: {"prompt": text} or {"messages": [...]} (through the chat
        template) -> {"tokens", "count", "max_model_len"}."""
        codec = self.session.need_codec()
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list")
            ids = codec.encode_chat(messages, add_generation_prompt=_field(
                body, "add_generation_prompt", bool, True), **self.template_kwargs)
        elif isinstance(body.get("prompt"), str):
            ids = codec.encode(body["prompt"],
                               add_special_tokens=_field(body, "add_special_tokens", bool, True))
        else:
            raise BadRequest("give 'prompt' (a string) or 'messages' (a chat) to tokenize")
        self._send(200, {"tokens": ids, "count": len(ids),
                         "max_model_len": self.session.model.max_context})

    def _detokenize(self, body: dict) -> None:
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise BadRequest("'tokens' must be a list of token ids")
        self._send(200, {"prompt": self.session.need_codec().decode(self.session.encode(ids))})

    def _chat(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        kwargs = dict(self.template_kwargs)
        tools = _tools(body)
        if tools:
            kwargs["tools"] = tools
        kwargs.update(_field(body, "chat_template_kwargs", dict, {}))
        effort = _field(body, "reasoning_effort", str, None)
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        ids = self.session.need_codec().encode_chat(messages, **kwargs)
        self._run(body, [ids], "chat.completion", chat=True)

    def _run(self, body: dict, prompts: list[list[int]], kind: str, chat: bool,
             prompt_texts: list[str | None] | None = None) -> None:
        """prompts: one (chat) or more (completions), n choices each, numbered prompt by
        prompt; prompt_texts: the prompts as given, for "echo" (completions)."""
        max_tokens, sampling, stop, stream, n, echo, best_of = _params(body, chat)
        fmt = body.get("response_format")
        if fmt is not None:
            sampling.grammar = self.session.grammar(fmt)
        split = chat  # a reasoning model's grammar holds its answer, after its reasoning
        texts_in = prompt_texts or [None] * len(prompts)

        def prompt_text(p: int) -> str:
            """Prompt p as echoed: as given, else decoded (ids as text without a tokenizer)."""
            ids = prompts[p]
            return texts_in[p] if texts_in[p] is not None else (
                self.session.codec.decode(ids) if self.session.codec
                else " ".join(map(str, ids)))

        # stream_options.include_usage: a last chunk with the usage and no choices
        usage = _field(_field(body, "stream_options", dict, {}), "include_usage", bool, False)
        s = self.session
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": rid, "created": created, "model": s.name}
        configs = seeded_rows(sampling, n)
        if not stream:
            # max_tokens 0 (echo: the prompt's log-probabilities only) reads the prompt and
            # drops the token it then draws
            # best_of > n: best_of candidates per prompt, the n likeliest kept (the highest
            # mean log-probability per token, as OpenAI ranks them)
            cands = configs if best_of == n else seeded_rows(
                replace(sampling, logprobs=sampling.logprobs or 0), best_of)
            jobs = [(p, c) for p in range(len(prompts)) for c in cands]
            reqs = self.batcher.run_all([Request(prompts[p], max(1, max_tokens), c, stop,
                                                 channels=split) for p, c in jobs])
            kept = list(zip(reqs, (p for p, _ in jobs), strict=True))
            if best_of > n:
                kept = [x for p in range(len(prompts))
                        for x in _best(kept[p * best_of:(p + 1) * best_of], n,
                                       sampling.logprobs is None)]
            choices = []
            for i, (r, p) in enumerate(kept):
                ids, o = prompts[p], r.completion
                if max_tokens == 0:
                    o = replace(o, token_ids=[], text="" if o.text is not None else None,
                                finish_reason="length", logprobs=[] if o.logprobs is not None
                                else None)
                    r.completion = o
                text = o.text if o.text is not None else " ".join(map(str, o.token_ids))
                message = {"role": "assistant", "content": text}
                if o.reasoning:
                    message["reasoning_content"] = o.reasoning
                finish = o.finish_reason
                if o.tool_calls:
                    message["tool_calls"] = [_tool_call(c) for c in o.tool_calls]
                    message["content"] = text or None
                    finish = "tool_calls"
                lp = None if o.logprobs is None else _logprob_doc(
                    self.session, ids + o.token_ids if echo else o.token_ids,
                    o.prompt_logprobs + o.logprobs if echo else o.logprobs, chat)
                if echo:
                    text = prompt_text(p) + text
                choices.append({"index": i, "message": message, "logprobs": lp,
                                "finish_reason": finish} if chat else
                               {"index": i, "text": text, "logprobs": lp,
                                "finish_reason": o.finish_reason})
            new = sum(len(r.completion.token_ids) for r in reqs)
            stats = reqs[0].stats if len(reqs) == 1 else [r.stats for r in reqs]
            self._send(200, dict(head, object=kind, choices=choices, stats=stats,
                                 usage=_usage(prompts, reqs[::best_of], new)))
            return
        # choice i: prompt of[i] with configs[i % n] (n choices each, numbered prompt by prompt)
        of = [p for p in range(len(prompts)) for _ in configs]
        want_lp = sampling.logprobs is not None
        # one queue per choice of (kind, item): "content" or "reasoning_content" (text),
        # "tool_calls" (a call), "logprob" ((id, entry): before its token's text), "prompt"
        # (the prompt's entries, echo: before the first new token's)
        items: list[queue.Queue[tuple[str, object]]] = [queue.Queue() for _ in of]
        reqs = [self.batcher.submit(Request(
            prompts[of[i]], max(1, max_tokens), configs[i % n], stop,
            lambda t, q=q: q.put(("content", t)),
            channels=split, on_reasoning=lambda t, q=q: q.put(("reasoning_content", t)),
            on_tool_call=lambda t, q=q: q.put(("tool_calls", t)),
            on_logprob=(lambda t, e, q=q: q.put(("logprob", (t, e)))) if want_lp else None,
            on_prompt_logprobs=(lambda es, q=q: q.put(("prompt", es)))
            if echo and want_lp else None))
            for i, q in enumerate(items)]
        calls = [0] * len(of)  # tool calls streamed per choice
        pending: list[list[tuple[int, object]]] = [[] for _ in of]  # logprobs not sent
        offsets = [0] * len(of)  # completions: where the next token's text starts in a choice
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def logprobs(i: int, toks: list[int], entries: list) -> dict | None:
            """The logprobs of choice i's next tokens in a chunk (None: not asked)."""
            if not want_lp:
                return None
            doc = _logprob_doc(s, toks, entries, chat, offsets[i])
            offsets[i] += sum(map(len, doc.get("tokens", ())))
            return doc

        def event(i: int, delta_text, finish: str | None,
                  first: bool = False, key: str = "content") -> None:
            """A chunk of choice i, with the logprobs of its tokens since the last one."""
            got, pending[i] = pending[i], []
            lp = None if first else logprobs(i, [t for t, _ in got], [e for _, e in got])
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {key: delta_text} if delta_text is not None else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
                if want_lp:
                    choice["logprobs"] = lp
            else:
                choice = {"index": i, "text": delta_text or "", "logprobs": lp,
                          "finish_reason": finish}
            send(dict(head, object=obj, choices=[choice]))

        def echo_prompt(i: int, entries: list | None) -> None:
            """Completions "echo": the prompt first (with its logprobs when asked)."""
            send(dict(head, object=obj, choices=[{
                "index": i, "text": prompt_text(of[i]),
                "logprobs": logprobs(i, prompts[of[i]], entries),
                "finish_reason": None}]))

        def send(doc: dict | str) -> None:
            data = doc if isinstance(doc, str) else json.dumps(doc)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            for i in range(len(of)):
                if chat:
                    event(i, None, None, first=True)
                elif echo and not want_lp:
                    echo_prompt(i, None)
            finished = [False] * len(of)
            while not all(finished):
                idle = True
                for i, r in enumerate(reqs):
                    if finished[i]:
                        continue
                    done = r.done.is_set()  # then all its text is already queued
                    while not items[i].empty():
                        key, item = items[i].get()
                        idle = False
                        if key == "prompt":
                            echo_prompt(i, item)
                        elif max_tokens == 0:  # echo only: the token drawn is dropped
                            continue
                        elif key == "logprob":
                            pending[i].append(item)
                        else:
                            if key == "tool_calls":
                                item, calls[i] = [_tool_call(item, calls[i])], calls[i] + 1
                            event(i, item, None, key=key)
                    if not done:
                        continue
                    finished[i] = True
                    if r.error is not None:  # the status line has gone: an error event
                        send({"error": {"message": f"{type(r.error).__name__}: {r.error}",
                                        "type": "server_error", "code": 500}})
                    else:
                        o = r.completion
                        event(i, None, "length" if max_tokens == 0 else
                              "tool_calls" if o.tool_calls else o.finish_reason)
                if idle:
                    time.sleep(0.02)
            if usage and all(r.error is None for r in reqs):
                new = 0 if max_tokens == 0 else sum(len(r.completion.token_ids) for r in reqs)
                send(dict(head, object=obj, choices=[], usage=_usage(prompts, reqs[::n], new)))
            send("[DONE]")
        except OSError:  # the client went away: its rows end at the next token
            for r in reqs:
                r.cancelled = True


class Server(ThreadingHTTPServer):
    """The HTTP server and the batcher its handlers share; server_close() stops both."""

    daemon_threads = True

    def __init__(self, session: Session, host: str, port: int, max_batch: int | None = None,
                 log: bool = False, template_kwargs: dict | None = None):
        self.batcher = Batcher(session, max_batch, log=_log_line if log else None)
        handler = type("BoundHandler", (Handler,), {"session": session,
                                                    "batcher": self.batcher,
                                                    "template_kwargs": template_kwargs or {}})
        super().__init__((host, port), handler)

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()


def _log_line(text: str) -> None:
    sys.stderr.write(f"moe-serve http: {text}\n")


def make_server(session: Session, host: str, port: int, max_batch: int | None = None,
                log: bool = False, template_kwargs: dict | None = None) -> Server:
    """An OpenAI-compatible server on host:port (0: any free port) batching up to max_batch
    requests (None: the model's max_batch); log: a stderr line per batch; template_kwargs:
    the chat template's variables unless a request sets them."""
    return Server(session, host, port, max_batch, log, template_kwargs)


def serve_forever(session: Session, host: str, port: int,
                  template_kwargs: dict | None = None) -> None:
    server = make_server(session, host, port, log=True, template_kwargs=template_kwargs)
    print(f"moe-serve http: serving {session.name} on http://{host}:{server.server_port} "
          "(/v1/completions, /v1/chat/completions, /v1/models, /health), batching up to "
          f"{server.batcher.max_batch} concurrent requests", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
