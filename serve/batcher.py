"""Continuous batching for the server: one worker thread runs a `DecodeBatch` on the session's
model; a request that arrives while others decode takes a free row (up to max_batch), reads
its prompt in the forward of their next decode step (or a bounded part a step:
prefill_step_tokens), then decodes with them, and leaves as soon as it ends. Requests start
in arrival order.

Every row samples with its own config and generator, so greedy, sampled and seeded requests
share a batch, and a seeded request draws the tokens it draws alone. Offloaded serving gains
the most from batching: the experts a step needs are moved to the device once for all rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.generate import DecodeBatch, Row, check_prompts
from serve.sampling import SamplingConfig
from serve.session import Completion, Session, TextRow


@dataclass(eq=False)
class Request:
    """One prompt to complete. on_text(text) is called from the worker thread as text is
    decided; set `cancelled` to end the row at its next token (its client has gone).
    channels: a chat answer, split into reasoning (streamed to on_reasoning), tool calls (each
    to on_tool_call) and text when the model answers in a format serve/answer.py knows.
    on_logprob(id, (log-prob, alternatives)): each new token's, before its text (the sampling
    asks for logprobs); on_prompt_logprobs(entries): the prompt's (sampling.prompt_logprobs),
    before the first new token's."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    channels: bool = False
    on_reasoning: Callable[[str], None] | None = None
    on_tool_call: Callable[[dict], None] | None = None
    on_logprob: Callable[[int, tuple], None] | None = None
    on_prompt_logprobs: Callable[[list], None] | None = None
    cancelled: bool = False
    completion: Completion | None = None
    stats: dict | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = 0.0


class Batcher:
    """Runs requests on `session` from one worker thread, continuously batched (see module)."""

    def __init__(self, session: Session, max_batch: int | None = None,
                 log: Callable[[str], None] | None = None, continuous: bool = True,
                 joint: bool = True, on_done: Callable[[Request], None] | None = None):
        """log: called with one line per finished request (tokens, speed, batch), e.g. print;
        on_done: called with each request that ends, served or failed (metrics). For
        comparison: continuous=False is static batching, requests start only when the
        batch has drained; joint=False reads prompts in forwards of their own
        (DecodeBatch)."""
        self.session = session
        self.log, self.on_done = log, on_done
        self.continuous, self.joint = continuous, joint
        self.max_batch = max_batch or session.model.max_batch
        if self.max_batch > session.model.max_batch:
            raise ValueError(f"max_batch {self.max_batch} exceeds the model's KV cache rows "
                             f"({session.model.max_batch})")
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting: list[Request] = []  # taken off the queue, not yet started (FIFO)
        self._closing = False
        self._batch = self._new_batch()
        self._rows: dict[Row, tuple[Request, TextRow]] = {}
        self.batches: deque[int] = deque(maxlen=1024)  # sizes of the last groups started
        self._worker = threading.Thread(target=self._loop, name="moe-serve-batcher",
                                        daemon=True)
        self._worker.start()

    def submit(self, req: Request) -> Request:
        """Queue `req` (checked here, so a bad prompt fails alone); wait on req.done."""
        check_prompts(self.session.model, [req.ids])
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        req.sampling.check(self.session.model.cfg.vocab_size)
        if req.stop:
            self.session.need_codec()
        req.submitted = time.perf_counter()
        self._queue.put(req)
        return req

    def run(self, req: Request) -> Request:
        """submit(req) and wait for it; re-raises the error its batch hit."""
        return self.run_all([req])[0]

    def run_all(self, reqs: list[Request]) -> list[Request]:
        """Submit every request (so they can share a batch), then wait for all of them;
        re-raises the first error one of their batches hit."""
        for r in reqs:
            self.submit(r)
        for r in reqs:
            r.done.wait()
        failed = next((r.error for r in reqs if r.error is not None), None)
        if failed is not None:
            raise failed
        return reqs

    def close(self) -> None:
        """Stop the worker once the requests already submitted are served."""
        self._queue.put(None)
        self._worker.join(timeout=5)

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests submitted and not started yet."""
        return len(self._waiting) + self._queue.qsize()

    def _ended(self, req: Request) -> None:
        if self.on_done is not None:  # counted before its client hears of it
            self.on_done(req)
        req.done.set()

    # -- worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._take_arrivals():
            try:
                self._start(self._select())
                for row in self._batch.step():
                    self._finish(row)
            except BaseException as e:  # noqa: BLE001 - every client in the batch is told
                self._fail(e)

    def _take_arrivals(self) -> bool:
        """Move queued requests to the waiting list; block while there is nothing to do.
        -> False once closed and everything submitted is served."""
        while True:
            idle = not self._rows
            if idle and not self._waiting and self._closing:
                return False
            try:
                req = self._queue.get(block=idle and not self._waiting)
            except queue.Empty:
                return True
            if req is None:
                self._closing = True
            else:
                self._waiting.append(req)

    def _select(self) -> list[Request]:
        """The oldest waiting requests, as many as there are free rows (static batching:
        none until the running batch has drained)."""
        for r in self._waiting:
            if r.cancelled:  # its client left while it waited
                self._ended(r)
        self._waiting = [r for r in self._waiting if not r.cancelled]
        if self._rows and not self.continuous:
            return []
        pick = self._waiting[:self._batch.free]
        self._waiting = self._waiting[len(pick):]
        return pick

    def _start(self, reqs: list[Request]) -> None:
        """Prefill `reqs` into the running batch (their first tokens are chosen)."""
        if not reqs:
            return
        texts = [self.session.text_row(r.stop, self._streamer(r, r.on_text),
                                       ignore_eos=r.sampling.ignore_eos,
                                       cancelled=lambda r=r: r.cancelled, channels=r.channels,
                                       on_reasoning=self._streamer(r, r.on_reasoning),
                                       prompt=r.ids,
                                       on_tool_call=self._streamer(r, r.on_tool_call))
                 for r in reqs]
        hooks = [_TokenHook(t.on_token, self._streamer(r, r.on_logprob),
                            self._streamer(r, r.on_prompt_logprobs))
                 for r, t in zip(reqs, texts, strict=True)]
        try:
            rows = self._batch.add([r.ids for r in reqs], [r.max_tokens for r in reqs],
                                   hooks, [r.sampling for r in reqs])
        except BaseException as e:
            for r in reqs:
                r.error = e
                self._ended(r)
            raise
        for row, h in zip(rows, hooks, strict=True):
            h.row = row
        self._rows.update({row: (r, t) for row, r, t in zip(rows, reqs, texts, strict=True)})
        self.batches.append(len(reqs))
        for row in rows:
            if row.done:
                self._finish(row)

    def _streamer(self, req: Request, to: Callable | None) -> Callable | None:
        if to is None:
            return None

        def send(*item) -> None:
            if req.cancelled:
                return
            try:
                to(*item)
            except Exception:  # noqa: BLE001 - a client that went away ends its row only
                req.cancelled = True

        return send

    def _finish(self, row: Row) -> None:
        req, text = self._rows.pop(row)
        req.completion = Completion(row.out, text.finish(), row.finish_reason, row.prompt_len,
                                    text.reasoning, text.tool_calls, row.logprobs,
                                    row.prompt_logprobs)
        req.stats = dict(row.stats, ttft_s=row.t_first - req.submitted,
                         queue_s=row.t_added - req.submitted,
                         latency_s=row.t_done - req.submitted)
        self._ended(req)
        if self.log is not None:
            st = req.stats
            self.log(f"request done: {st['prompt_tokens']} prompt + {st['new_tokens']} new "
                     f"tokens, {st['tokens_per_s']:.1f} tok/s decode, ttft "
                     f"{st['ttft_s'] * 1e3:.0f} ms, batch of {st['batch_size']}, "
                     f"{self.running} still running, expert hit rate "
                     f"{st['expert_hit_rate']:.2f}")

    def _fail(self, e: BaseException) -> None:
        """Every request in the running batch gets `e`; the batch starts afresh."""
        for req, _ in self._rows.values():
            req.error = e
            self._ended(req)
        self._rows.clear()
        self._batch = self._new_batch()

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.session.model, self.session.stop_ids, capacity=self.max_batch,
                           joint=self.joint)


class _TokenHook:
    """A row's on_token: its log-probabilities to the client (the prompt's before the first
    new token's), then the token to its TextRow -> True when the row must end."""

    def __init__(self, on_token: Callable[[int], bool], on_logprob: Callable | None,
                 on_prompt_logprobs: Callable | None):
        self.on_token, self.on_logprob = on_token, on_logprob
        self.on_prompt_logprobs = on_prompt_logprobs
        self.row: Row | None = None  # set once DecodeBatch.add has made it

    def __call__(self, tok: int) -> bool:
        row = self.row
        if (self.on_prompt_logprobs is not None and row.prompt_logprobs is not None
                and len(row.out) == 1):
            self.on_prompt_logprobs(row.prompt_logprobs)
        if self.on_logprob is not None and row.logprobs is not None:
            self.on_logprob(tok, row.logprobs[-1])
        return self.on_token(tok)
