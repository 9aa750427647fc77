"""Request batching for the server: one worker thread runs a `Session`; requests that arrive
while a batch is running wait and then start together, up to the model's max_batch.

Rows of one batch share one sampling generator, so only requests whose sampling is the same
and unseeded (or greedy) go together; a request with a seed runs alone, so that its seed
gives the same tokens whatever else the server is doing. Offloaded serving gains the most
from this: the experts a batch needs are moved to the device once for all of its rows.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.generate import SamplingConfig, check_prompts
from serve.session import Completion, Session


@dataclass
class Request:
    """One prompt to complete. on_text(text) is called from the worker thread as text is
    decided; set `cancelled` to end the row at its next token (its client has gone)."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False
    completion: Completion | None = None
    stats: dict | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple | None:
        """Requests with equal keys may share a batch; None: this one runs alone."""
        s = self.sampling
        if s.temperature == 0:
            return ("greedy",)
        if s.seed is not None:
            return None
        return ("sample", s.temperature, s.top_k, s.top_p)


class Batcher:
    """Runs requests on `session` from one worker thread, several at a time (see module)."""

    def __init__(self, session: Session, max_batch: int | None = None,
                 log: Callable[[str], None] | None = None):
        """log: called with one line per batch run (size, tokens, speed), e.g. print."""
        self.session = session
        self.log = log
        self.max_batch = max_batch or session.model.max_batch
        if self.max_batch > session.model.max_batch:
            raise ValueError(f"max_batch {self.max_batch} exceeds the model's KV cache rows "
                             f"({session.model.max_batch})")
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting: list[Request] = []  # taken off the queue, not yet run (FIFO)
        self.batches: deque[int] = deque(maxlen=1024)  # sizes of the last batches run
        self._worker = threading.Thread(target=self._loop, name="moe-serve-batcher",
                                        daemon=True)
        self._worker.start()

    def submit(self, req: Request) -> Request:
        """Queue `req` (checked here, so a bad prompt fails alone); wait on req.done."""
        check_prompts(self.session.model, [req.ids])
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        req.sampling.check()
        if req.stop:
            self.session.need_codec()
        self._queue.put(req)
        return req

    def run(self, req: Request) -> Request:
        """submit(req) and wait for it; re-raises the error its batch hit."""
        self.submit(req).done.wait()
        if req.error is not None:
            raise req.error
        return req

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)

    # -- worker ----------------------------------------------------------------------------
    def _next_batch(self) -> list[Request] | None:
        """Block for the first waiting request, then add every queued one that can join it."""
        if not self._waiting:
            first = self._queue.get()
            if first is None:
                return None
            self._waiting.append(first)
        while True:  # drain what has arrived meanwhile, keeping arrival order
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # close after the waiting requests are served
                break
            self._waiting.append(nxt)
        lead = self._waiting[0]
        batch, key = [lead], lead.batch_key()
        if key is not None:
            for r in self._waiting[1:]:
                if len(batch) == self.max_batch:
                    break
                if r.batch_key() == key:
                    batch.append(r)
        self._waiting = [r for r in self._waiting if all(r is not b for b in batch)]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.cancelled]
            try:
                if live:
                    self._run(live)
            except BaseException as e:  # noqa: BLE001 - every waiting client gets the error
                for r in live:
                    r.error = e
            finally:
                for r in batch:
                    r.done.set()

    def _run(self, batch: list[Request]) -> None:
        self.batches.append(len(batch))

        def on_text(row: int, text: str) -> None:
            cb = batch[row].on_text
            if cb is not None and not batch[row].cancelled:
                try:
                    cb(text)
                except Exception:  # noqa: BLE001 - a client that went away ends its row only
                    batch[row].cancelled = True

        outs, res = self.session.complete(
            [r.ids for r in batch], [r.max_tokens for r in batch], batch[0].sampling,
            [r.stop for r in batch], on_text, cancelled=lambda row: batch[row].cancelled)
        stats = dict(res.stats, batch_size=len(batch))
        for r, o in zip(batch, outs, strict=True):
            r.completion, r.stats = o, stats
        if self.log is not None:
            self.log(f"batch of {len(batch)}: {stats['prompt_tokens']} prompt + "
                     f"{stats['new_tokens']} new tokens, {stats['tokens_per_s']:.1f} tok/s "
                     f"decode, ttft {stats['ttft_s'] * 1e3:.0f} ms, expert hit rate "
                     f"{stats['expert_hit_rate']:.2f}")
