"""Speculation by prompt lookup (ServeConfig.speculate): rows draft the tokens that
followed the latest earlier occurrence of their last 3 and verify them in the step's one
forward. Greedy rows keep the drafts the model's argmax confirms: the tokens of decoding one
at a time (transformers' greedy ones), in fewer steps where the answer repeats its context.
Sampled rows draw by speculative sampling: the distribution of a token a step, a seeded row
the same tokens in any batch. Stop tokens, limits, penalties and min_tokens hold at every
drafted position."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.generate import DecodeBatch, generate  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.session import Session  # noqa: E402
from serve.speculate import PREDICTED_DRAFT, judge, lookup, next_length, predicted  # noqa: E402
from tests.hf_models import build_hf, hf_greedy  # noqa: E402
from tests.http_helpers import request, serving  # noqa: E402
from tests.test_serve_cli import cli  # noqa: E402
from tests.test_serve_reasoning import save_scripted  # noqa: E402

CYCLE = ["a", "b", "c", "d", "e"]
WORDS = ["[UNK]", "<eos>"] + CYCLE


def serve(d, **kw) -> OffloadedModel:
    kw = {"max_context": 64, "dtype": "float32", **kw}
    return OffloadedModel(ServeConfig(model=str(d), **kw))


def test_lookup_drafts_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]  # the latest of two
    assert lookup([1, 2, 3, 9, 1, 2, 3], 4) == [9, 1, 2, 3]
    assert lookup([4, 2, 3, 8, 6, 2, 3], 2) == []  # a match of 2 tokens drafts nothing
    assert lookup([5, 6, 7], 4) == [] and lookup([5], 4) == []


def test_a_prediction_drafts_its_continuation_where_the_answer_is():
    pred = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert predicted(pred, [], 3) == [1, 2, 3] and predicted(pred, [1, 2], 4) == [3, 4, 5, 6]
    assert predicted(pred, pred, 3) == []  # all of it said
    # an edit: after the answer parts from it, the occurrence of its last 3 tokens nearest
    # the answer's own length
    assert predicted(pred, [1, 2, 0, 0, 5, 6, 7], 2) == [8, 9]
    twice = [7, 8, 9, 1, 2, 3, 7, 8, 9, 4, 5]
    assert predicted(twice, [0, 0, 0, 0, 0, 0, 7, 8, 9], 2) == [4, 5]
    assert predicted(twice, [0, 7, 8, 9], 2) == [1, 2]
    assert predicted(pred, [0, 1], 2) == [] and predicted(pred, [0, 0, 0], 2) == []


def test_a_row_drafts_fewer_after_misses_and_more_after_hits():
    assert next_length(8, 8, 8, 8) == 8  # all kept, at the most already
    assert next_length(8, 3, 2, 2) == 4  # all kept: one more than allowed
    assert next_length(8, 8, 8, 0) == 1 and next_length(8, 8, 5, 2) == 3  # misses: kept + 1


def accept(probs, logits, draft: list[int], gen) -> list[int]:
    """The tokens a row takes after verifying its whole draft (probs, logits: [len(draft)
    + 1, V]): judge position by position until a draft is not kept, as DecodeBatch does."""
    took = []
    for s in range(len(draft) + 1):
        kept, t = judge(None if probs is None else probs[s], logits[s],
                        draft[s] if s < len(draft) else None, gen)
        took.append(t)
        if not kept:
            break
    return took


def test_accept_keeps_the_distribution_of_drawing_a_token_a_step():
    """Speculative sampling with a point-mass draft: over 20000 draws the first token taken
    follows p0 and, after a kept draft, the next follows p1, whatever the drafts are;
    greedy keeps the drafts that are the argmax."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25], [0.4, 0.05, 0.05, 0.2, 0.3],
                          [0.2, 0.2, 0.2, 0.2, 0.2]])
    gen = torch.Generator().manual_seed(0)
    for draft in ([2, 4], [1, 1]):  # a likely draft, an unlikely one
        taken = [accept(probs, probs.log(), draft, gen) for _ in range(20000)]
        first = torch.bincount(torch.tensor([t[0] for t in taken]), minlength=5) / len(taken)
        torch.testing.assert_close(first, probs[0], atol=0.015, rtol=0)
        after = [t[1] for t in taken if t[0] == draft[0]]
        second = torch.bincount(torch.tensor(after), minlength=5) / len(after)
        torch.testing.assert_close(second, probs[1], atol=0.03, rtol=0)
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert accept(None, logits, [1, 0], None) == [1, 0, 2]
    assert accept(None, logits, [1, 2], None) == [1, 0]


def test_judging_a_drawn_draft_keeps_the_distribution():
    """Speculative sampling against the draft's distribution q: the draft x ~ q is kept
    with probability min(1, p(x) / q(x)), a rejection redrawn from max(0, p - q): over
    20000 draws the token taken follows p, for a q close to p and one far from it."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    gen = torch.Generator().manual_seed(1)
    for q in (torch.tensor([0.15, 0.15, 0.3, 0.1, 0.3]), torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])):
        took, kept = [], 0
        for _ in range(20000):
            x = int(torch.multinomial(q, 1, generator=gen))
            keep, t = judge(p, p.log(), x, gen, q)
            kept += keep
            took.append(t)
        freq = torch.bincount(torch.tensor(took), minlength=5) / len(took)
        torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
        assert abs(kept / 20000 - float(torch.minimum(p, q).sum())) < 0.015  # the overlap


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # answers that repeat
def test_greedy_tokens_are_transformers_with_fewer_steps(tmp_path, family):
    hf = build_hf(family)
    hf.save_pretrained(tmp_path)
    pattern = torch.randint(1, 300, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [pattern * 4, pattern[:4] * 3 + [7]]
    want = [hf_greedy(hf, p, 16) for p in prompts]
    runs = {k: generate(serve(tmp_path, speculate=k, max_batch=2), prompts, 16)
            for k in (0, 4)}
    for r in runs.values():
        assert r.token_ids == want
    assert runs[0].stats["drafted_tokens"] == 0
    assert runs[4].stats["accepted_tokens"] > 0
    one = {k: generate(serve(tmp_path, speculate=k), prompts[:1], 16, keep_logits=True)
           for k in (0, 4)}
    assert one[4].stats["steps"] < one[0].stats["steps"] == 16
    with torch.no_grad():  # each kept token's logits, drafted or not, are transformers'
        ref = hf.generate(torch.tensor(prompts[:1]), max_new_tokens=16, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(one[4].logits[0], torch.cat(ref.logits), rtol=1e-4, atol=1e-4)


def test_a_predicted_answer_is_drafted_without_speculate(tmp_path):
    """SamplingConfig.prediction (OpenAI's predicted outputs) drafts up to PREDICTED_DRAFT
    tokens a step even with speculate off: transformers' greedy tokens either way; the
    answer itself as the prediction is kept whole, in far fewer steps; a wrong one is
    rejected and counted so."""
    hf = build_hf("mixtral", seed=4)
    hf.save_pretrained(tmp_path)
    prompt = [5, 17, 99, 3, 250, 41]
    want = hf_greedy(hf, prompt, 20)
    plain = generate(serve(tmp_path), [prompt], 20)
    assert plain.token_ids == [want] and plain.stats["steps"] == 20
    batch = DecodeBatch(serve(tmp_path))
    (row,) = batch.add([prompt], [20], sampling=[SamplingConfig(prediction=tuple(want))])
    while batch.live:
        batch.step()
    # the prompt's step gives token 1, two steps 9 each (8 drafts kept and the token after
    # them), the last token a step of its own (the limit leaves no room for a draft)
    assert PREDICTED_DRAFT == 8 and batch.steps == 4
    assert row.out == want and row.pred_accepted == row.pred_drafted == 16
    assert row.stats["prediction_accepted_tokens"] == 16
    assert row.stats["prediction_rejected_tokens"] == 0
    wrong = tuple(want[:10] + [t + 1 for t in want[10:]])  # right, then wrong
    res = generate(serve(tmp_path), [prompt], 20, SamplingConfig(prediction=wrong))
    assert res.token_ids == [want]
    assert res.stats["accepted_tokens"] == 8 < res.stats["drafted_tokens"]  # the right part
    with pytest.raises(ValueError, match="prediction holds token ids outside"):
        SamplingConfig(prediction=(5, 10**6)).check(300)


@pytest.fixture(scope="module")
def cycle_dir(tmp_path_factory):
    """A scripted model whose greedy answer walks a b c d e a b ... (after "d", "e"; with
    eos "d", it stops there)."""
    d = tmp_path_factory.mktemp("cycle")
    save_scripted(d, WORDS, CYCLE + ["a"], "{{ messages }}", "<eos>", ["<eos>"])
    return d


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def test_a_repeating_answer_takes_k_plus_one_tokens_a_step(cycle_dir):
    prompt = ids(*CYCLE, *CYCLE, "a")
    plain = generate(serve(cycle_dir), [prompt], 21)
    fast = generate(serve(cycle_dir, speculate=4), [prompt], 21)
    assert fast.token_ids == plain.token_ids == [ids(*(CYCLE * 5)[1:22])]
    assert plain.stats["steps"] == 21  # one prefill, then a token a step
    assert fast.stats["steps"] == 5  # the prefill's token, then 5 a step
    assert fast.stats["accepted_tokens"] == fast.stats["drafted_tokens"] == 16
    short = generate(serve(cycle_dir, speculate=4), [prompt], 3)  # the limit holds
    assert short.token_ids == [ids("b", "c", "d")] and short.finish_reasons == ["length"]


def test_a_stop_token_among_the_drafts_ends_the_row_there(cycle_dir, monkeypatch):
    prompt = ids(*CYCLE, *CYCLE, "a")
    m = serve(cycle_dir, speculate=4)
    res = generate(m, [prompt], 20, stop_ids=ids("d"))
    assert res.token_ids == [ids("b", "c", "d")] and res.finish_reasons == ["stop"]
    assert res.stats["accepted_tokens"] >= 1  # "c" and "d" came from drafts


def test_a_seeded_sampled_row_draws_as_alone_beside_others(cycle_dir):
    """A sampled, seeded row that speculates beside a greedy one draws the tokens it draws
    alone (its drafts and draws use its own generator only); a penalized row beside them
    gives its tokens of a token a step."""
    prompt = ids(*CYCLE, *CYCLE, "a")
    sampled = SamplingConfig(temperature=20.0, seed=9)  # hot enough to leave the cycle
    alone = generate(serve(cycle_dir, speculate=3), [prompt], 12, sampled)
    assert alone.stats["drafted_tokens"] > 0
    batch = DecodeBatch(serve(cycle_dir, speculate=3, max_batch=3))
    rows = batch.add([prompt] * 3, [12] * 3, sampling=[
        SamplingConfig(), sampled, SamplingConfig(repetition_penalty=1.3)])
    while batch.live:
        batch.step()
    assert rows[0].out == ids(*(CYCLE * 3)[1:13]) and rows[0].accepted > 0
    assert rows[1].out == alone.token_ids[0] != rows[0].out
    penalized = generate(serve(cycle_dir), [prompt], 12,
                         SamplingConfig(repetition_penalty=1.3)).token_ids[0]
    assert rows[2].out == penalized and rows[2].accepted > 0


def test_penalties_and_min_tokens_hold_at_every_drafted_position(cycle_dir):
    """Logits adjusted by what came before (penalties, stop tokens held back until
    min_tokens) are adjusted at each drafted position as that many tokens would see them:
    the tokens of a token a step."""
    prompt = ids(*CYCLE, *CYCLE, "a")
    for cfg, stops in ((SamplingConfig(frequency_penalty=2.0, presence_penalty=2.0), ()),
                       (SamplingConfig(min_tokens=6), ids("d"))):
        plain, fast = (generate(serve(cycle_dir, speculate=k), [prompt], 10, cfg, stops)
                       for k in (0, 4))
        assert fast.token_ids == plain.token_ids
        assert fast.stats["drafted_tokens"] > 0


def test_speculate_is_a_count():
    with pytest.raises(ValueError, match="speculate must be >= 0"):
        ServeConfig(model="m", speculate=-1).check()


def test_http_prediction_is_drafted_and_counted_in_the_usage(cycle_dir):
    """OpenAI's "prediction" over HTTP: the same answer whatever is predicted, with the
    predicted tokens the model kept and rejected in usage.completion_tokens_details; a
    malformed one is a 400."""
    session = Session(ServeConfig(model=str(cycle_dir), max_context=64, dtype="float32"))
    body = {"prompt": " ".join(CYCLE * 2 + ["a"]), "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    with serving(session) as srv:
        url = srv.url + "/v1/completions"
        plain = json.loads(request(url, body)[1])
        text = plain["choices"][0]["text"]
        assert "completion_tokens_details" not in plain["usage"]
        # right: 8 drafts kept in the second step, 1 in the third (the limit leaves room for
        # one); right, then wrong ("b" where the answer has "a")
        for pred, kept, rejected in ((text, 9, 0), ([{"type": "text", "text": text}], 9, 0),
                                     ("b c d e b", 3, 1)):
            code, doc = request(url, dict(body, prediction={"type": "content",
                                                            "content": pred}))
            assert code == 200, doc
            doc = json.loads(doc)
            assert doc["choices"][0]["text"] == text
            details = doc["usage"]["completion_tokens_details"]
            assert (details["accepted_prediction_tokens"],
                    details["rejected_prediction_tokens"]) == (kept, rejected)
        for bad in ({"content": "x"}, {"type": "content", "content": 3}, "x"):
            code, doc = request(url, dict(body, prediction=bad))
            assert code == 400 and "'prediction'" in json.loads(doc)["error"]["message"]


def test_cli_prediction_file_drafts_the_predicted_text(cycle_dir, tmp_path):
    """moe-serve generate --prediction-file: the answer as before, in far fewer steps when
    the file holds it; a missing file is named."""
    pred = tmp_path / "pred.txt"
    pred.write_text(" ".join((CYCLE * 3)[1:11]))
    args = ["generate", "--model", str(cycle_dir), "--prompt", " ".join(CYCLE * 2 + ["a"]),
            "--max-new-tokens", "10", "--ignore-eos", "--device", "cpu", "--json", "--quiet"]
    plain, fast = (cli(*args, *extra) for extra in ([], ["--prediction-file", str(pred)]))
    plain, fast = json.loads(plain.stdout), json.loads(fast.stdout)
    assert fast["token_ids"] == plain["token_ids"] and plain["stats"]["steps"] == 10
    assert fast["stats"]["accepted_tokens"] == fast["stats"]["drafted_tokens"] == 8
    assert fast["stats"]["steps"] == 2  # the prompt's token, then 8 drafts and one more
    p = cli(*args, "--prediction-file", str(tmp_path / "none.txt"), check=False)
    assert p.returncode != 0 and "no such file" in p.stderr and "Traceback" not in p.stderr
