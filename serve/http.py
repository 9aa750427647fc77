"""OpenAI-compatible HTTP server over a `Session`: POST /v1/completions and
/v1/chat/completions (server-sent events when "stream": true), /v1/responses (OpenAI's
Responses API, stateless, over chat: serve/http_responses.py), GET /v1/models and /health;
POST /tokenize and /detokenize as vLLM has them; GET /metrics for Prometheus
(serve/metrics.py).

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
the rest as "content"; in stream deltas too. "tool_choice": "required" or a named function
forces a call (as vLLM does): the answer is held to JSON (the function's arguments, or a list
of {"name", "parameters"}) and comes back as "tool_calls" (streamed once whole).

Sampling: temperature, top_p, top_k, seed, presence / frequency / repetition penalties,
logit_bias, min_tokens, ignore_eos, "response_format" (JSON object or JSON schema,
serve/grammar.py), "prediction" (OpenAI's predicted outputs: the text the answer is expected
to be much like, drafted for speculation; usage counts its accepted and rejected tokens), and
for completions best_of and "suffix" (fill in the middle, with the model's FIM tokens).

Access: with an API key (moe-serve http --api-key, or MOE_SERVE_API_KEY), the /v1 routes and
/tokenize, /detokenize answer only requests that carry "Authorization: Bearer KEY" (401
otherwise; /health and /metrics stay open, as vLLM has them). With allowed origins
(--allowed-origins), browsers on those origins may call the server (CORS: the
Access-Control-Allow-* headers, and OPTIONS preflights); none by default.

Stopping: SIGTERM stops taking connections and lets the requests in flight finish (up to
--drain-timeout seconds; a request that comes meanwhile on an open connection gets 503), then
exits; Ctrl-C stops at once.

Requests are read by serve/http_params.py and answered by serve/http_answer.py.
"""

from __future__ import annotations

import hmac
import json
import signal
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serve.batcher import Batcher
from serve.http_answer import Job, Stream, answer
from serve.http_params import BadRequest, call_format, field, params, tools
from serve.http_responses import ResponseEvents, chat_body, response_doc
from serve.metrics import Metrics
from serve.session import Session


class Handler(BaseHTTPRequestHandler):
    session: Session
    batcher: Batcher
    metrics: Metrics
    template_kwargs: dict  # the server's defaults for chat templates
    api_key: str | None  # required of the guarded routes as a bearer token
    origins: tuple[str, ...]  # the origins browsers may call from ("*": any)
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one line per request on stderr
        sys.stderr.write(f"moe-serve http: {self.address_string()} {fmt % args}\n")

    def _send(self, code: int, doc: dict, headers: dict | None = None) -> None:
        self._send_bytes(code, json.dumps(doc).encode(), "application/json", headers)

    def _send_bytes(self, code: int, data: bytes, kind: str,
                    headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str, kind: str = "invalid_request_error",
               headers: dict | None = None) -> None:
        self._send(code, {"error": {"message": message, "type": kind, "code": code}}, headers)

    def end_headers(self) -> None:
        """Every response says which origin may read it, when the server allows it."""
        origin = self._allowed_origin()
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")
        super().end_headers()

    def _allowed_origin(self) -> str | None:
        """The Access-Control-Allow-Origin value for this request's Origin, if allowed."""
        origin = self.headers.get("Origin")
        if "*" in self.origins:
            return "*"
        return origin if origin in self.origins else None

    def _authorized(self) -> bool:
        """Whether the request may use the route it asks for: /health and /metrics, or a
        bearer token equal to the API key (401 sent otherwise)."""
        if self.api_key is None or self.path in ("/health", "/metrics"):
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.api_key.encode()):
            return True
        self._error(401, "the API key in the Authorization header is not this server's" if got
                    else "a valid API key is needed: send \"Authorization: Bearer KEY\"",
                    "authentication_error", {"WWW-Authenticate": "Bearer"})
        return False

    def do_OPTIONS(self):
        """A CORS preflight: the methods and headers allowed, for an allowed origin."""
        if self._allowed_origin() is None:
            self._error(405, f"no route OPTIONS {self.path} (no cross-origin access allowed; "
                        "moe-serve http --allowed-origins)", "not_found")
            return
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        with self.server.busy():
            if not self._refuse_while_draining():
                self._get()

    def do_POST(self):
        with self.server.busy():
            if not self._refuse_while_draining():
                self._post()

    def _refuse_while_draining(self) -> bool:
        """503 (and close) once the server drains: it serves only what was in flight."""
        if not self.server.draining:
            return False
        self.close_connection = True
        self._error(503, "the server is shutting down", "server_error")
        return True

    def _get(self):
        if not self._authorized():
            return
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.session.name, "object": "model", "created": 0,
                 "owned_by": "moe-serve", "max_model_len": self.session.model.max_context}]})
        elif self.path == "/metrics":
            self._send_bytes(200, *self.metrics.render())
        else:
            self._error(404, f"no route GET {self.path}", "not_found")

    def _post(self):
        routes = {"/v1/completions": self._completions,
                  "/v1/chat/completions": self._chat, "/v1/responses": self._responses,
                  "/tokenize": self._tokenize, "/detokenize": self._detokenize}
        if self.path not in routes:
            self._error(404, f"no route POST {self.path}", "not_found")
            return
        if not self._authorized():
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
        suffix = field(body, "suffix", str, "")
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
            ids = codec.encode_chat(messages, add_generation_prompt=field(
                body, "add_generation_prompt", bool, True), **self.template_kwargs)
        elif isinstance(body.get("prompt"), str):
            ids = codec.encode(body["prompt"],
                               add_special_tokens=field(body, "add_special_tokens", bool, True))
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

    def _responses(self, body: dict) -> None:
        """OpenAI's Responses API, as the chat request it means (serve/http_responses.py)."""
        chat = chat_body(body)
        if chat.get("stream"):
            self._chat(chat, event=ResponseEvents(body, self._named_event))
        else:
            self._chat(chat, reply=lambda doc: self._send(200, response_doc(body, doc)))

    def _chat(self, body: dict, reply=None, event=None) -> None:
        """reply(doc) / event(chunk): where the answer / a stream's chunks go (the client,
        unless a Responses request translates them)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        kwargs = dict(self.template_kwargs)
        funcs, forced = tools(body)
        if funcs:
            kwargs["tools"] = funcs
        kwargs.update(field(body, "chat_template_kwargs", dict, {}))
        effort = field(body, "reasoning_effort", str, None)
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        ids = self.session.need_codec().encode_chat(messages, **kwargs)
        self._run(body, [ids], "chat.completion", chat=True,
                  forced=None if forced is None else (funcs, forced), reply=reply, event=event)

    def _run(self, body: dict, prompts: list[list[int]], kind: str, chat: bool,
             prompt_texts: list[str | None] | None = None,
             forced: tuple[list[dict], str] | None = None, reply=None, event=None) -> None:
        """prompts: one (chat) or more (completions), n choices each, numbered prompt by
        prompt; prompt_texts: the prompts as given, for "echo" (completions); forced: the
        tools and the call a chat's tool_choice forces (its answer held to call_format)."""
        ask = params(body, chat)
        fmt = body.get("response_format")
        if forced is not None:
            if fmt is not None:
                raise BadRequest("'response_format' and a 'tool_choice' that forces a call "
                                 "both set the answer's form; give one")
            fmt, ask.forced_call = call_format(*forced), forced[1]
        if fmt is not None:  # a reasoning model's grammar holds its answer, not its reasoning
            ask.sampling.grammar = self.session.grammar(fmt)
        if ask.prediction is not None:  # drafted for speculation
            ask.sampling.prediction = tuple(self.session.need_codec().encode(
                ask.prediction, add_special_tokens=False))
        job = Job(self.session, prompts, chat, ask, prompt_texts or [])
        if not ask.stream:
            doc = answer(job, self.batcher)
            if reply is not None:
                reply(doc)
            else:
                self._send(200, doc)
            return
        stream = Stream(job, self.batcher, event or self._event)  # a bad prompt: a 400 here
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        stream.run()

    def _event(self, doc: dict | str) -> None:
        """One server-sent event: a JSON document, or "[DONE]"."""
        data = doc if isinstance(doc, str) else json.dumps(doc)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _named_event(self, kind: str, doc: dict) -> None:
        """One server-sent event with its name (the Responses API's)."""
        self.wfile.write(f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode())
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server and the batcher its handlers share; server_close() stops both."""

    daemon_threads = True

    def __init__(self, session: Session, host: str, port: int, max_batch: int | None = None,
                 log: bool = False, template_kwargs: dict | None = None,
                 api_key: str | None = None, origins: tuple[str, ...] = ()):
        self.metrics = Metrics(session.model, lambda: self.batcher.running,
                               lambda: self.batcher.waiting)
        self.batcher = Batcher(session, max_batch, log=_log_line if log else None,
                               on_done=self.metrics.done)
        handler = type("BoundHandler", (Handler,), {"session": session,
                                                    "batcher": self.batcher,
                                                    "metrics": self.metrics,
                                                    "template_kwargs": template_kwargs or {},
                                                    "api_key": api_key or None,
                                                    "origins": tuple(origins)})
        super().__init__((host, port), handler)
        self.draining = False  # refusing new requests, finishing those in flight
        self._active = 0  # requests being answered
        self._idle = threading.Condition()

    @contextmanager
    def busy(self):
        """A request being answered, for drain()."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._active

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (503) and wait up to timeout seconds for those in flight ->
        whether they all finished."""
        self.draining = True
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    @property
    def url(self) -> str:
        """http://host:port of the server."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()


def _log_line(text: str) -> None:
    sys.stderr.write(f"moe-serve http: {text}\n")


def make_server(session: Session, host: str, port: int, max_batch: int | None = None,
                log: bool = False, template_kwargs: dict | None = None,
                api_key: str | None = None, origins: tuple[str, ...] = ()) -> Server:
    """An OpenAI-compatible server on host:port (0: any free port) batching up to max_batch
    requests (None: the model's max_batch); log: a stderr line per batch; template_kwargs:
    the chat template's variables unless a request sets them; api_key: the bearer token the
    guarded routes need (None: open); origins: those browsers may call from ("*": any)."""
    return Server(session, host, port, max_batch, log, template_kwargs, api_key, origins)


def serve_forever(session: Session, host: str, port: int,
                  template_kwargs: dict | None = None, api_key: str | None = None,
                  origins: tuple[str, ...] = (), drain_timeout: float = 30.0) -> None:
    """Serve until SIGTERM (then drain: the requests in flight finish, up to drain_timeout
    seconds) or Ctrl-C (at once)."""
    server = make_server(session, host, port, log=True, template_kwargs=template_kwargs,
                         api_key=api_key, origins=origins)
    stopped = threading.Event()

    def on_term(signum, frame):  # serve_forever returns once shutdown() is called elsewhere
        stopped.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, on_term)
    print(f"moe-serve http: serving {session.name} on http://{host}:{server.server_port} "
          "(/v1/completions, /v1/chat/completions, /v1/responses, /v1/models, /health, "
          f"/metrics), batching up to {server.batcher.max_batch} concurrent requests"
          + ("; an API key is required" if api_key else "")
          + (f"; browsers may call from {', '.join(origins)}" if origins else ""),
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
        if stopped.is_set():
            _log_line(f"SIGTERM: finishing {server.in_flight} request(s) in flight (up to "
                      f"{drain_timeout:g} s)")
            done = server.drain(drain_timeout)
            _log_line("stopped" if done else "stopped with requests still in flight")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
