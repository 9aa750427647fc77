"""Continuous batching behind the HTTP server: requests that arrive while others decode join
them (and take a row as soon as one frees), give the tokens they give alone (and transformers
gives), keep their own limits, stop strings and seeds; a gone client ends only its row;
errors reach every client of the batch and the worker lives on."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

transformers = pytest.importorskip("transformers")

from serve.batcher import Batcher, Request  # noqa: E402
from serve.config import ServeConfig  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.session import Session  # noqa: E402
from tests.hf_models import hf_greedy, save_served_model  # noqa: E402
from tests.http_helpers import serving  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("batched")
    hf = save_served_model(d, seed=5)
    # 1100 KiB: 8 of the 24 expert slots next to 4 rows of KV cache
    session = Session(ServeConfig(model=str(d), memory_budget="1100KiB", max_context=64,
                                  max_batch=4, dtype="float32"))
    return session, hf


@pytest.fixture
def batcher(served):
    b = Batcher(served[0], log=LOG.append)
    yield b
    b.close()


LOG: list[str] = []


class Gate:
    """Holds the worker inside the prefill of a lone first request (3 greedy tokens) until
    open(), so that the requests submitted meanwhile are all waiting when it returns."""

    def __init__(self, batcher: Batcher, monkeypatch):
        self.entered, self.go = threading.Event(), threading.Event()
        model = batcher.session.model
        real = model.prefill  # every forward (step too) goes through it

        def held(*args, **kwargs):
            if not self.go.is_set():
                self.entered.set()
                self.go.wait(timeout=60)
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "prefill", held)
        self.req = batcher.submit(Request([5, 6, 7], 3, GREEDY))
        assert self.entered.wait(timeout=60), "the worker never started the first request"

    def open(self) -> None:
        self.go.set()
        assert self.req.done.wait(timeout=60)


def test_requests_join_the_running_batch_and_match_running_alone(served, batcher,
                                                                 monkeypatch):
    session, hf = served
    prompts = [[3, 14, 15, 92, 65], [7, 8], [100, 101, 102, 103], [42, 43, 44]]
    limits = [6, 3, 8, 5]
    gate = Gate(batcher, monkeypatch)
    reqs = [batcher.submit(Request(p, n, GREEDY)) for p, n in zip(prompts, limits, strict=True)]
    gate.open()
    for r in reqs:
        assert r.done.wait(timeout=120) and r.error is None, r.error
    # 3 join the gate's request (4 KV rows); the 4th takes the gate's row when it ends and
    # decodes next to the two still running
    assert list(batcher.batches) == [1, 3, 1]
    assert [r.stats["batch_size"] for r in reqs] == [4, 4, 4, 3]
    assert all(line.startswith("request done: ") and " tok/s decode, ttft " in line
               for line in LOG[-5:])
    eos = session.stop_ids
    for p, n, r in zip(prompts, limits, reqs, strict=True):
        want = hf_greedy(hf, p, n)
        want = want[:next((i + 1 for i, t in enumerate(want) if t in eos), len(want))]
        assert r.completion.token_ids == want
        assert r.stats["new_tokens"] == len(want) and r.stats["ttft_s"] >= r.stats["queue_s"]
        alone, _ = session.complete([p], n)
        assert alone[0].token_ids == r.completion.token_ids


def test_static_batching_waits_for_the_running_batch_to_drain(served, monkeypatch):
    b = Batcher(served[0], continuous=False)
    try:
        gate = Gate(b, monkeypatch)
        reqs = [b.submit(Request([7, 8, 9], 3, GREEDY)) for _ in range(2)]
        gate.open()
        for r in reqs:
            assert r.done.wait(timeout=120) and r.error is None, r.error
        assert list(b.batches) == [1, 2]
        assert [r.stats["batch_size"] for r in reqs] == [2, 2]  # never beside the gate's
    finally:
        b.close()


def test_per_request_stop_strings_and_seeds_share_a_batch(served, batcher, monkeypatch):
    session, _ = served
    ids = session.codec.encode("def add")
    full, _ = session.complete([ids], 12, SamplingConfig(ignore_eos=True))
    text = full[0].text
    stop = text[3:5]
    seeded = SamplingConfig(temperature=0.8, seed=7)
    alone = session.complete([ids], 6, seeded)[0][0].token_ids
    gate = Gate(batcher, monkeypatch)
    cut = batcher.submit(Request(ids, 12, GREEDY, stop=[stop]))
    s1 = batcher.submit(Request(ids, 6, seeded))
    plain = batcher.submit(Request(ids, 12, GREEDY))
    s2 = batcher.submit(Request(ids, 6, seeded))
    gate.open()
    for r in (cut, s1, plain, s2):
        assert r.done.wait(timeout=120) and r.error is None, r.error
    # three join the gate's request, whatever their sampling; s2 takes the first freed row
    assert list(batcher.batches) == [1, 3, 1]
    assert s1.stats["batch_size"] == 4
    assert cut.completion.text == text[:text.index(stop)]
    assert cut.completion.finish_reason == "stop"
    assert plain.completion.text == session.complete([ids], 12)[0][0].text
    # each row has its own generator: a seed draws what it draws alone
    assert s1.completion.token_ids == s2.completion.token_ids == alone


def test_a_gone_client_ends_only_its_row_and_a_left_one_never_starts(batcher, monkeypatch):
    def hang_up(_text):
        raise BrokenPipeError("client closed the stream")

    gate = Gate(batcher, monkeypatch)
    gone = batcher.submit(Request([9, 10, 11], 20, GREEDY, on_text=hang_up))
    left = batcher.submit(Request([9, 10, 11], 20, GREEDY))
    left.cancelled = True  # its client left while it waited: it never starts
    stays = batcher.submit(Request([9, 10, 11], 20, GREEDY))
    gate.open()
    for r in (gone, left, stays):
        assert r.done.wait(timeout=120) and r.error is None
    assert left.completion is None and list(batcher.batches) == [1, 2]
    assert gone.cancelled
    assert len(gone.completion.token_ids) < len(stays.completion.token_ids)


def test_a_failing_step_reaches_every_request_of_the_batch_and_the_worker_lives_on(
        served, batcher, monkeypatch):
    session, _ = served
    gate = Gate(batcher, monkeypatch)
    joiners = [batcher.submit(Request([1, 2, 3], 4, GREEDY)) for _ in range(2)]
    monkeypatch.setattr(session.model, "prefill", lambda *a, **k: 1 / 0)  # their prefill fails
    gate.go.set()
    for r in (gate.req, *joiners):
        assert r.done.wait(timeout=60)
        assert isinstance(r.error, ZeroDivisionError), r.error
    monkeypatch.undo()
    assert len(batcher.run(Request([1, 2, 3], 2, GREEDY)).completion.token_ids) == 2
    with pytest.raises(ValueError, match="longer than the context"):
        batcher.submit(Request(list(range(1, 80)), 2, GREEDY))


def test_http_concurrent_requests_are_batched_and_each_answered(served, monkeypatch):
    session, hf = served
    with serving(session) as srv:
        base = srv.url
        gate = Gate(srv.batcher, monkeypatch)
        prompts = [[3, 14, 15], [20, 21, 22, 23], [50, 51]]
        answers: dict[int, dict] = {}

        def post(i):
            body = json.dumps({"prompt": prompts[i], "max_tokens": 5, "temperature": 0,
                               "stream": i == 1}).encode()
            req = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answers[i] = {"status": r.status, "body": r.read().decode()}

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        while srv.batcher._queue.qsize() < 3:  # all three wait behind the gate
            threading.Event().wait(0.01)
        gate.open()
        for t in threads:
            t.join(timeout=120)
        assert list(srv.batcher.batches) == [1, 3]  # the three join the gate's request
        codec = session.codec
        for i in (0, 2):
            doc = json.loads(answers[i]["body"])
            assert doc["choices"][0]["text"] == codec.decode(hf_greedy(hf, prompts[i], 5))
            assert doc["stats"]["batch_size"] == 4
        events = [line[6:] for line in answers[1]["body"].splitlines()
                  if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == codec.decode(hf_greedy(hf, prompts[1], 5))
