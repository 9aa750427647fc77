"""Prefix reuse: a prompt that begins with tokens a KV-cache row still holds reads only the
rest, and its tokens and logits are still transformers' greedy ones: a chat's next turn in
the same row, a shared start copied from a busy row, across model families (sliding windows,
latent attention, attention sinks); what must read everything does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.generate import DecodeBatch, generate  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from tests.hf_models import build_hf  # noqa: E402


def serve(d, **kw) -> OffloadedModel:
    kw = {"max_context": 64, "max_batch": 2, "dtype": "float32", "prefill_chunk": 4, **kw}
    return OffloadedModel(ServeConfig(model=str(d), **kw))


def hf_generate(hf, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    return ref.sequences[0, len(prompt):].tolist(), torch.cat(ref.logits)


def assert_like_hf(hf, res, b: int, prompt: list[int], n: int) -> None:
    toks, logits = hf_generate(hf, prompt, n)
    assert res.token_ids[b] == toks
    torch.testing.assert_close(res.logits[b], logits, rtol=1e-4, atol=1e-4)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {"sliding_window": 6}), ("deepseek_v2", {}), ("gpt_oss", {})])
def test_the_next_turn_reads_only_what_is_new(tmp_path, family, overrides):
    """Turn two = turn one's prompt + its answer + a new message: the row holds all but the
    answer's last token, so only that token and the message are read (under a budget of 4
    expert slots, chunks of 4)."""
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path)
    probe = serve(tmp_path)
    m = serve(tmp_path, memory_budget=probe.fixed_bytes + 4 * probe.slot_bytes)
    first = random_ids(9, 1)
    one = generate(m, [first], 5)
    assert one.stats["cached_tokens"] == 0
    second = first + one.token_ids[0] + random_ids(6, 2)
    two = generate(m, [second], 6, keep_logits=True)
    assert two.stats["cached_tokens"] == len(first) + 4
    assert two.stats["prompt_tokens"] == len(second)
    assert_like_hf(hf, two, 0, second, 6)


def test_a_shared_start_is_copied_from_a_busy_row(tmp_path):
    """While one row decodes, a prompt that shares its first tokens (a system prompt) takes
    another row, copies those tokens' entries and reads the rest; both answer as alone."""
    hf = build_hf("qwen3_moe")
    hf.save_pretrained(tmp_path)
    m = serve(tmp_path)
    system = random_ids(10, 3)
    a, b = system + random_ids(3, 4), system + random_ids(5, 5)
    batch = DecodeBatch(m, keep_logits=True)
    (ra,) = batch.add([a], [8])
    while ra.pending:
        batch.step()
    batch.step()  # ra decodes: its row holds its prompt and its first token
    (rb,) = batch.add([b], [6])
    assert rb.kv_row != ra.kv_row and rb.cached == len(system)
    while batch.live:
        batch.step()
    for r, p in ((ra, a), (rb, b)):
        toks, logits = hf_generate(hf, p, len(r.out))
        assert r.out == toks
        torch.testing.assert_close(torch.stack(r.logits), logits, rtol=1e-4, atol=1e-4)
    assert m.kv.held[rb.kv_row] == b + rb.out[:-1]  # what it wrote, recorded


def test_what_must_read_the_whole_prompt_does(tmp_path):
    """Prompt log-probabilities score every prompt token: a prompt that asks for them takes no
    tokens a row holds unscored; prefix_cache=False reads every prompt whole."""
    hf = build_hf("olmoe")
    hf.save_pretrained(tmp_path)
    prompt = random_ids(12, 6)
    m = serve(tmp_path)
    generate(m, [prompt], 3)
    res = generate(m, [prompt], 3, SamplingConfig(prompt_logprobs=True))
    assert res.stats["cached_tokens"] == 0 and len(res.prompt_logprobs[0]) == len(prompt)
    again = generate(m, [prompt], 3, keep_logits=True)
    assert again.stats["cached_tokens"] == len(prompt) - 1  # the last one is always read
    assert_like_hf(hf, again, 0, prompt, 3)
    off = serve(tmp_path, prefix_cache=False)
    generate(off, [prompt], 3)
    assert generate(off, [prompt], 3).stats["cached_tokens"] == 0


@pytest.mark.parametrize("chunk", [4, 64])
def test_scored_prompts_take_a_scored_prefix(tmp_path, chunk):
    """lm-evaluation-harness's multiple choice: one context, a continuation per choice, every
    token scored. The second prompt takes the context (less its last token) with its scores
    from the row the first left, and reads only the rest: its scores are those of a fresh
    read. A prompt asking for more alternatives than were kept reads everything."""
    hf = build_hf("qwen3_moe")
    hf.save_pretrained(tmp_path)
    context, a, b = random_ids(14, 11), random_ids(3, 12), random_ids(4, 13)
    scored = SamplingConfig(logprobs=2, prompt_logprobs=True)
    m = serve(tmp_path, prefill_chunk=chunk)
    first = generate(m, [context + a], 1, scored)
    second = generate(m, [context + b], 1, scored)
    assert first.stats["cached_tokens"] == 0
    assert second.stats["cached_tokens"] == len(context) - 1
    fresh = generate(serve(tmp_path, prefix_cache=False, prefill_chunk=chunk),
                     [context + b], 1, scored)
    got, want = second.prompt_logprobs[0], fresh.prompt_logprobs[0]
    assert len(got) == len(want) == len(context + b) and got[0] is None is want[0]
    for g, w in zip(got[1:], want[1:], strict=True):
        assert [t for t, _ in g[1]] == [t for t, _ in w[1]]
        torch.testing.assert_close(torch.tensor([g[0]] + [v for _, v in g[1]]),
                                   torch.tensor([w[0]] + [v for _, v in w[1]]),
                                   rtol=1e-4, atol=1e-4)
    assert second.token_ids == fresh.token_ids
    more = generate(m, [context + a], 1, SamplingConfig(logprobs=3, prompt_logprobs=True))
    assert more.stats["cached_tokens"] == 0  # 2 alternatives kept, 3 asked
    fewer = generate(m, [context + a], 1, SamplingConfig(logprobs=1, prompt_logprobs=True))
    assert fewer.stats["cached_tokens"] == len(context + a) - 2
    assert all(len(e[1]) == 1 for e in fewer.prompt_logprobs[0][1:])


def test_scored_prompts_added_together_read_their_context_once(tmp_path):
    """The continuations of one context sent in one request (lm-evaluation-harness batches
    them): the first reads the context, the others copy it with its scores and read their
    own tokens; every score is a fresh read's. A prompt that wants more alternatives than
    its would-be leader scores reads alone."""
    hf = build_hf("mixtral")
    hf.save_pretrained(tmp_path)
    context = random_ids(20, 21)
    ends = [random_ids(3, 22 + i) for i in range(3)]
    prompts = [context + e for e in ends]
    scored = SamplingConfig(logprobs=2, prompt_logprobs=True)
    m = serve(tmp_path, max_batch=3)
    res = generate(m, prompts, 1, scored)
    assert res.stats["cached_tokens"] == 2 * (len(context) - 1)
    fresh = generate(serve(tmp_path, max_batch=3, prefix_cache=False), prompts, 1, scored)
    for got, want in zip(res.prompt_logprobs, fresh.prompt_logprobs, strict=True):
        assert len(got) == len(want) and got[0] is None
        torch.testing.assert_close(torch.tensor([e[0] for e in got[1:]]),
                                   torch.tensor([e[0] for e in want[1:]]), rtol=1e-4, atol=1e-4)
        assert [[t for t, _ in e[1]] for e in got[1:]] == [[t for t, _ in e[1]]
                                                          for e in want[1:]]
    assert res.token_ids == fresh.token_ids
    batch = DecodeBatch(serve(tmp_path, max_batch=3))
    rows = batch.add(prompts[:2], [1, 1], sampling=[
        scored, SamplingConfig(logprobs=3, prompt_logprobs=True)])
    while batch.live:
        batch.step()
    assert [r.cached for r in rows] == [0, 0]


def test_a_write_the_cache_was_not_told_of_is_not_reused(tmp_path):
    """A forward straight into a row (not through DecodeBatch) leaves it holding only the
    tokens before the write: a later prompt equal to the old one reuses those alone and
    still answers as transformers does."""
    hf = build_hf("mixtral")
    hf.save_pretrained(tmp_path)
    m = serve(tmp_path, max_batch=1)
    prompt = random_ids(10, 7)
    generate(m, [prompt], 4)
    assert m.kv.held[0][:10] == prompt
    other = torch.tensor([random_ids(5, 8)])
    m.step(other, [0], [3], [5])  # positions 3..7 now hold other tokens
    assert m.kv.held[0] == prompt[:3]
    res = generate(m, [prompt], 4, keep_logits=True)
    assert res.stats["cached_tokens"] == 3
    assert_like_hf(hf, res, 0, prompt, 4)


def test_the_same_prompt_added_together_is_read_once(tmp_path):
    """n choices of one prompt: the first row reads it, the others copy it and read only its
    last token; each draws what it draws alone with its seed, and greedy rows give
    transformers' tokens and logits."""
    hf = build_hf("qwen2_moe")
    hf.save_pretrained(tmp_path)
    m = serve(tmp_path, max_batch=3)
    prompt = random_ids(11, 9)
    res = generate(m, [prompt] * 3, 5, keep_logits=True)
    assert res.stats["cached_tokens"] == 2 * (len(prompt) - 1)
    for b in range(3):
        assert_like_hf(hf, res, b, prompt, 5)
    sampled = SamplingConfig(temperature=1.0, seed=4)
    together = generate(m, [prompt] * 3, 6, sampled).token_ids
    fresh = serve(tmp_path, max_batch=3, prefix_cache=False)
    assert together == generate(fresh, [prompt] * 3, 6, sampled).token_ids
    assert generate(fresh, [prompt] * 3, 6, sampled).stats["cached_tokens"] == 0


def test_prompts_added_together_share_their_common_start(tmp_path):
    """Prompts that start alike (a 20-token system prompt, then different questions), added
    at once: the first reads the start for all, the others take it and read their own rest;
    a start shorter than DecodeBatch.SHARE_MIN is read by each. All answer as transformers
    does."""
    hf = build_hf("olmoe")
    hf.save_pretrained(tmp_path)
    m = serve(tmp_path, max_batch=3)
    system = random_ids(20, 10)
    prompts = [system + random_ids(n, 11 + n) for n in (4, 7, 2)]
    res = generate(m, prompts, 4, keep_logits=True)
    assert res.stats["cached_tokens"] == 2 * len(system)
    for b, p in enumerate(prompts):
        assert_like_hf(hf, res, b, p, 4)
    # in one step (one pass over the experts): in each layer the others take the start
    # just after the first row's chunks wrote it; a chunk a step (layerwise=False), they
    # copy it once the first row has read it
    for layerwise, steps in ((True, 1), (False, 7)):  # 5 chunks of start, then 2 rounds
        batch = DecodeBatch(serve(tmp_path, max_batch=3), keep_logits=True,
                            layerwise=layerwise)
        rows = batch.add(prompts, [4] * 3)
        for _ in range(steps):
            assert not all(r.out for r in rows)
            batch.step()
        assert all(r.out for r in rows) and [r.cached for r in rows] == [0, 20, 20]
        while batch.live:
            batch.step()
        for r, want in zip(rows, res.token_ids, strict=True):
            assert r.out == want
            torch.testing.assert_close(torch.stack(r.logits), res.logits[rows.index(r)],
                                       rtol=1e-5, atol=1e-5)
    short = [system[:5] + random_ids(6, 20 + i) for i in range(2)]
    m = serve(tmp_path, max_batch=3)
    assert generate(m, short, 2).stats["cached_tokens"] == 0


@pytest.mark.parametrize("value", ["yes", 1])
def test_prefix_cache_takes_true_or_false(value):
    with pytest.raises(ValueError, match="prefix_cache must be true or false"):
        ServeConfig(model="m", prefix_cache=value).check()
