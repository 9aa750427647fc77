"""Speculation with a draft model (ServeConfig.draft_model, serve/draft.py): where prompt
lookup finds nothing, a small causal LM sharing the served model's vocabulary drafts each
row's next tokens greedily, up to one it is unsure of (draft_min_prob); the served model
verifies them in its step's forward. Greedy answers are transformers' whatever the draft
proposes; a draft that is the served model itself has every draft kept, K + 1 tokens a
step; its weights and KV caches count in the budget; bad drafts are refused by name."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.draft import Drafter, draft_nbytes  # noqa: E402
from serve.generate import DecodeBatch, generate  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.speculate import DraftAsk, Drafted  # noqa: E402
from tests.hf_models import VOCAB, hf_greedy, saved_hf  # noqa: E402


def serve(d, **kw) -> OffloadedModel:
    kw = {"max_context": 64, "dtype": "float32", "draft_min_prob": 0.0, **kw}
    return OffloadedModel(ServeConfig(model=str(d), **kw))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random Mixtral (the served model) and its directory."""
    d = tmp_path_factory.mktemp("target")
    return saved_hf("mixtral", d, seed=1), d


def save_dense_draft(d, vocab: int = VOCAB, seed: int = 5, init: float = 0.02):
    """A tiny random Llama (a dense draft) with `vocab` tokens, saved in d; init: its weights'
    std (0.5 makes its attention, so its logits, depend on each token and position)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64,
                                   initializer_range=init)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return d


PROMPTS = [[5, 17, 99, 3, 250, 41, 8], [120, 7, 7, 64]]


def test_greedy_tokens_are_transformers_whatever_the_draft(served, tmp_path):
    """A random dense draft mostly misses, the served model itself never does: either way
    the answers are transformers' greedy ones; a perfect draft takes K + 1 tokens a step."""
    hf, d = served
    want = [hf_greedy(hf, p, 12) for p in PROMPTS]
    dense = save_dense_draft(tmp_path / "draft")
    for draft in (dense, d):
        m = serve(d, speculate=3, draft_model=str(draft), max_batch=2)
        res = generate(m, PROMPTS, 12)
        assert res.token_ids == want
        assert res.stats["drafted_tokens"] > 0
        assert m.drafter.forwards < m.drafter.row_forwards  # both rows' drafts in one forward
    assert res.stats["accepted_tokens"] == res.stats["drafted_tokens"]  # the model itself
    one = generate(serve(d, speculate=3, draft_model=str(d)), PROMPTS[:1], 12)
    assert one.token_ids == want[:1]
    assert one.stats["steps"] == 1 + 11 // 4 + (11 % 4 > 0)  # the prefill's token, 4 a step
    plain = generate(serve(d), PROMPTS[:1], 12)
    assert plain.stats["steps"] == 12


def test_the_draft_cache_follows_what_each_row_kept(served, tmp_path):
    """A row's draft cache drops the drafts the served model rejected and feeds only what it
    lacks: its drafts are the draft model's greedy continuation of the row's tokens, and a
    new prompt in a row reuses the start it shares with the row's old tokens."""
    _, d = served
    draft_dir = save_dense_draft(tmp_path / "draft")
    ref = transformers.AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    dr = Drafter(draft_dir, d, VOCAB, torch.device("cpu"), torch.float32, rows=2)
    assert dr.min_prob == 0  # every token drafted, however unsure
    fed = []
    real = dr.model.forward

    def counting(*a, **kw):
        fed.append(kw["input_ids"].shape[1])
        return real(*a, **kw)

    dr.model.forward = counting
    for context in (PROMPTS[0], PROMPTS[0] + [11, 12], PROMPTS[0] + [11, 99, 3], PROMPTS[1]):
        fed.clear()
        (got,) = (d.tokens for d in dr.draft([DraftAsk(0, context, 3)]))
        assert got == hf_greedy(ref, context, 3)
        held = dr.held[0]
        assert held == context + got[:-1]
        assert dr.live.shape == (1, len(held))  # a lone row: no hidden slot kept
        if context == PROMPTS[0] + [11, 12]:  # it held the prompt and 2 drafts: 2 new tokens
            assert fed[0] == 2
    assert [d.tokens for d in dr.draft([DraftAsk(1, PROMPTS[1], 0)])] == [[]]
    assert [d.tokens for d in dr.draft([DraftAsk(1, list(range(1, 63)), 4)])] == [[]]


def test_drafts_stop_before_an_unsure_token_and_lookup_comes_first(served, tmp_path):
    """A draft ends before the first token the draft model gives less than draft_min_prob
    (none at 1.0: a token a step); where prompt lookup finds a match its drafts are taken
    and the draft model is not asked."""
    hf, d = served
    draft_dir = save_dense_draft(tmp_path / "draft")
    dr = Drafter(draft_dir, d, VOCAB, torch.device("cpu"), torch.float32, rows=1,
                 min_prob=0.02)
    ref = transformers.AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
    probs = [float(torch.softmax(sc[0], -1).max()) for sc in out.scores]
    sure = next((i for i, p in enumerate(probs) if p < 0.02), 4)
    (got,) = dr.draft([DraftAsk(0, PROMPTS[0], 4)])
    assert got.tokens == out.sequences[0, len(PROMPTS[0]):][:sure].tolist()
    none = generate(serve(d, speculate=3, draft_model=str(draft_dir), draft_min_prob=1.0),
                    PROMPTS[:1], 8)
    assert none.stats["drafted_tokens"] == 0 and none.stats["steps"] == 8
    m = serve(d, speculate=3, draft_model=str(draft_dir))
    asked = []
    m.drafter.draft = lambda asks: asked.extend(a.k for a in asks) or [Drafted([]) for _ in asks]
    pattern = PROMPTS[0][:4]
    generate(m, [pattern * 3], 4)  # its answers' last 3 tokens rarely occur before
    n_asked = len(asked)
    batch = DecodeBatch(m)
    (row,) = batch.add([pattern * 3], [10])
    row.out = pattern[:3]  # the answer so far ends like the prompt's start: a match
    assert batch._draft(row).tokens == pattern[3:] + pattern[:2] and len(asked) == n_asked
    assert n_asked > 0


def test_a_sampled_row_with_a_draft_draws_as_alone_beside_others(served, tmp_path):
    """A seeded sampled row that speculates with a draft beside a greedy one draws what it
    draws alone (its draws use its own generator; the draft is deterministic)."""
    _, d = served
    kw = dict(speculate=2, draft_model=str(d))
    sampled = SamplingConfig(temperature=0.7, seed=4)
    alone = generate(serve(d, **kw), PROMPTS[:1], 10, sampled)
    batch = DecodeBatch(serve(d, max_batch=2, **kw))
    rows = batch.add([PROMPTS[1], PROMPTS[0]], [10, 10],
                     sampling=[SamplingConfig(), sampled])
    while batch.live:
        batch.step()
    assert rows[1].out == alone.token_ids[0] and rows[1].drafted > 0


def test_a_sampled_row_keeps_the_drafts_drawn_from_its_own_distribution(served):
    """A sampled row's drafts are drawn from the draft model's distribution under the row's
    temperature and top-k, and judged against it (min(1, p / q)): the served model as its
    own draft has nearly every draft kept, where a certain (greedy) draft of the same model
    is kept only as often as the row would draw it."""
    _, d = served
    cfg = SamplingConfig(temperature=0.9, top_k=50, seed=3)
    res = generate(serve(d, speculate=3, draft_model=str(d)), PROMPTS, 16, cfg)
    st = res.stats
    assert st["drafted_tokens"] >= 20 and st["accepted_tokens"] >= 0.9 * st["drafted_tokens"]
    m = serve(d, speculate=3, draft_model=str(d))
    real = m.drafter.draft
    m.drafter.draft = lambda asks: real([replace(a, sampling=None) for a in asks])  # greedy
    st = generate(m, PROMPTS, 16, cfg).stats
    assert st["accepted_tokens"] < 0.7 * st["drafted_tokens"]


def test_the_draft_counts_in_the_budget(served, tmp_path):
    _, d = served
    draft = save_dense_draft(tmp_path / "draft")
    size = draft_nbytes(draft, torch.float32, 2, 64)
    params = sum(p.numel() for p in
                 transformers.AutoModelForCausalLM.from_pretrained(draft).parameters())
    # K and V: layers, heads, dims, bytes, rows, slots (twice the context and 64 hidden)
    assert size == params * 4 + 2 * 2 * 1 * 8 * 4 * 2 * (2 * 64 + 64)
    assert draft_nbytes(draft, torch.float32, 1, 64) == params * 4 + 2 * 2 * 1 * 8 * 4 * 64
    plain = serve(d, max_batch=2, speculate=2)
    with_draft = serve(d, max_batch=2, speculate=2, draft_model=str(draft))
    assert with_draft.fixed_bytes == plain.fixed_bytes + size
    assert "draft model" in with_draft.budget_report
    tight = plain.fixed_bytes + plain.slot_bytes  # one slot without the draft
    with pytest.raises(ValueError, match="too small.*draft model"):
        serve(d, max_batch=2, speculate=2, draft_model=str(draft), memory_budget=tight)


def test_bad_drafts_are_refused_by_name(served, tmp_path):
    _, d = served
    with pytest.raises(ValueError, match="no config.json"):
        serve(d, speculate=2, draft_model=str(tmp_path / "nowhere"))
    other = save_dense_draft(tmp_path / "v", vocab=VOCAB + 4)
    with pytest.raises(ValueError, match=f"vocabulary of {VOCAB + 4} tokens"):
        serve(d, speculate=2, draft_model=str(other))
    same = save_dense_draft(tmp_path / "t")
    (same / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (tmp_path / "target_tok").mkdir()
    served_dir = tmp_path / "target_tok"
    for f in d.iterdir():
        (served_dir / f.name).write_bytes(f.read_bytes())
    (served_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 1,
                                                                                "b": 0}}}))
    with pytest.raises(ValueError, match="tokenizer"):
        serve(served_dir, speculate=2, draft_model=str(same))
    with pytest.raises(ValueError, match="speculate .* must be >= 1"):
        ServeConfig(model=str(d), draft_model=str(same)).check()


def _is_continuation(ref, context: list[int], got: Drafted, tol: float = 1e-4) -> bool:
    """Whether drafts are the draft model's after context and the drafts before each (a fresh
    forward each, no cache): its argmax (within tol of the max, for near ties), or for
    sampled drafts drawn from its distribution (q within tol of its softmax)."""
    with torch.no_grad():
        for i, t in enumerate(got.tokens):
            logits = ref(input_ids=torch.tensor([context + got.tokens[:i]])).logits[0, -1]
            if got.q is not None:
                if not torch.allclose(got.q[i], torch.softmax(logits, -1), atol=tol, rtol=0):
                    return False
            elif logits[t] < logits.max() - tol:
                return False
    return True


def test_batched_drafts_are_each_rows_greedy_continuation(served, tmp_path):
    """Rows drafting together share forwards: a step takes as many as its longest draft.
    Through rounds where rows keep some drafts, take a new prompt, or sit idle, each row's
    drafts are still the draft model's continuation of its own context (greedy, or drawn
    from its distribution at temperature 1), and the hidden slots start the cache over
    before they pass twice the longest row (and 64)."""
    import random

    from tests.seeds import fresh_seed

    _, d = served
    draft_dir = save_dense_draft(tmp_path / "draft", init=0.5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    dr = Drafter(draft_dir, d, VOCAB, torch.device("cpu"), torch.float32, rows=3)
    (a,) = dr.draft([DraftAsk(0, PROMPTS[0], 2)])
    assert dr.live.shape[0] == 1  # row 0 alone: a batch of one
    (b,) = dr.draft([DraftAsk(2, PROMPTS[1], 2)])
    assert dr.forwards == 4 and dr.live.shape[0] == 3  # then rows 0 to 2
    assert _is_continuation(ref, PROMPTS[0], a) and _is_continuation(ref, PROMPTS[1], b)
    seed = fresh_seed()
    rng = random.Random(seed)
    contexts: list[list[int] | None] = [None] * 3
    widest, restarted = 0, False
    rnd = 0
    while rnd < 30 or not restarted and rnd < 400:  # until a restart, if 30 rounds had none
        rnd += 1
        asks = []
        for row in range(3):
            c = contexts[row]
            if c is None or len(c) > 50 or rng.random() < 0.1:  # a new prompt
                c = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 3, 20]))]
            elif rng.random() < 0.25:  # idle this round
                contexts[row] = c
                continue
            contexts[row] = c
            sampled = rng.random() < 0.5
            asks.append(DraftAsk(row, c, rng.randint(1, 4),
                                 SamplingConfig(temperature=1.0) if sampled else None,
                                 torch.Generator().manual_seed(rnd) if sampled else None))
        if not asks:
            continue
        before, width = dr.forwards, dr.live.shape[1]
        got = dr.draft(asks)
        restarted |= dr.live.shape[1] < width
        assert dr.forwards - before == max(len(g.tokens) for g in got)  # k, unless at the edge
        widest = max(widest, dr.live.shape[1])
        for a, g in zip(asks, got, strict=True):
            assert len(g.tokens) == a.k, seed
            assert _is_continuation(ref, list(a.context), g), (seed, rnd, a.row)
            kept = rng.randint(0, len(g.tokens))  # the served model keeps some, adds one
            contexts[a.row] = list(a.context) + g.tokens[:kept] + [rng.randrange(VOCAB)]
        assert widest <= 2 * 60 + 64
    assert restarted, seed
    assert dr.row_forwards > dr.forwards


def test_a_sliding_window_draft_drafts_within_its_window(served, tmp_path):
    """A draft with a sliding window (Mistral's) drafts nothing that would pass it, and its
    cache starts over before its slots would; within the window its drafts are its greedy
    continuation."""
    _, d = served
    torch.manual_seed(2)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, max_position_embeddings=64,
                                     sliding_window=12, initializer_range=0.5)
    transformers.MistralForCausalLM(cfg).eval().save_pretrained(tmp_path / "mistral")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mistral").eval()
    dr = Drafter(tmp_path / "mistral", d, VOCAB, torch.device("cpu"), torch.float32, rows=2)
    assert dr.limit == 12
    context = [5, 6, 7]
    for _ in range(4):
        a, _ = dr.draft([DraftAsk(0, context, 3), DraftAsk(1, [9] * len(context), 2)])
        assert dr.live.shape[1] <= 12
        assert _is_continuation(ref, context, a)
        context = context + a.tokens[:1] + [3]
    assert [g.tokens for g in dr.draft([DraftAsk(0, list(range(10)), 3)])] == [[]]
