"""Repetition, presence and frequency penalties and logit biases: transformers' repetition
penalty gives transformers' tokens; OpenAI's penalties and biases give what a plain loop over
transformers' logits gives; log-probabilities stay the model's; bad settings are refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.generate import generate  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from tests.hf_models import build_hf  # noqa: E402

NEW = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("penalties")
    hf = build_hf("mixtral")
    hf.save_pretrained(d)
    m = OffloadedModel(ServeConfig(model=str(d), max_context=64, max_batch=3, dtype="float32"))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (6, 9)]
    prompts[1][3:6] = prompts[1][:3]  # a repeated stretch
    return hf, m, prompts


def naive(hf, prompt: list[int], n: int, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy over transformers' logits with OpenAI's penalties and biases, one token at a
    time, the whole sequence re-read each step."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        out = ids[len(prompt):]
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        for t, b in (bias or {}).items():
            logits[t] += b
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("penalty", [1.6, 0.6])
def test_repetition_penalty_gives_transformers_tokens(served, penalty):
    hf, m, prompts = served
    plain = generate(m, prompts, NEW).token_ids
    res = generate(m, prompts, NEW, SamplingConfig(repetition_penalty=penalty))
    for p, toks in zip(prompts, res.token_ids, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                              repetition_penalty=penalty)
        assert toks == ref[0, len(p):].tolist()
    assert res.token_ids != plain  # the penalty changed the answer


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 0.8), (-0.5, 1.2)])
def test_presence_and_frequency_penalties_as_openai_defines_them(served, presence, frequency):
    hf, m, prompts = served
    cfg = SamplingConfig(presence_penalty=presence, frequency_penalty=frequency)
    res = generate(m, prompts, NEW, cfg)
    assert res.token_ids == [naive(hf, p, NEW, presence, frequency) for p in prompts]


def test_logit_bias_and_raw_logprobs(served):
    """A bias of +100 makes its token the answer; a bias against greedy's first choice
    changes it; logprobs (and kept logits) stay the model's, before any of it."""
    hf, m, prompts = served
    res = generate(m, prompts[:1], 4, SamplingConfig(logit_bias={7: 100.0}))
    assert res.token_ids == [[7] * 4]
    first = generate(m, prompts[:1], 1).token_ids[0][0]
    bias = {first: -100.0, 11: 2.5}
    res = generate(m, prompts[:1], NEW, SamplingConfig(logit_bias=bias, logprobs=2,
                                                       frequency_penalty=0.4),
                   keep_logits=True)
    assert res.token_ids[0] == naive(hf, prompts[0], NEW, frequency=0.4, bias=bias)
    raw = res.logits[0].log_softmax(-1)
    got = torch.tensor([lp for lp, _ in res.logprobs[0]])
    torch.testing.assert_close(got, raw[range(NEW), res.token_ids[0]])


def test_a_seeded_penalized_row_draws_the_same_tokens_in_any_batch(served):
    _, m, prompts = served
    cfg = SamplingConfig(temperature=0.8, seed=3, frequency_penalty=1.0,
                         repetition_penalty=1.2)
    alone = generate(m, prompts[1:], NEW, cfg).token_ids[0]
    # row 1 of a batch seeded 2 draws with seed 3; row 0 greedy and unpenalized beside it
    batch = generate(m, prompts, NEW, SamplingConfig(temperature=0.8, seed=2,
                                                     frequency_penalty=1.0,
                                                     repetition_penalty=1.2)).token_ids[1]
    assert batch == alone


@pytest.mark.parametrize("kw,fragment", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2]"),
    (dict(logit_bias={5: 101.0}), "logit_bias of token 5"),
    (dict(logit_bias={10**6: 1.0}), "not in the vocabulary"),
])
def test_bad_settings_are_refused_by_name(served, kw, fragment):
    _, m, prompts = served
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        generate(m, prompts[:1], 2, SamplingConfig(**kw))
