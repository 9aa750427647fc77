"""`moe-serve` as a user runs it: generate (JSON and streamed text), bench, errors with a
non-zero exit, and the OpenAI-compatible HTTP server (incl. streaming and HTTP 400s)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.session import Session  # noqa: E402
from serve.text import TextCodec  # noqa: E402
from tests.forked import run_module  # noqa: E402
from tests.hf_models import CODE_TEXTS, hf_greedy, save_served_model, save_tokenizer  # noqa: E402
from tests.http_helpers import request, serving  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    hf = save_served_model(d, seed=3)
    return d, hf


def cli(*args, check=True):
    if args and args[0] in ("generate", "bench", "chat"):  # float32 parity on cuda too
        args = (*args, "--dtype", "float32")
    p = run_module("serve", args, timeout=300)
    if check and p.returncode:
        raise AssertionError(f"moe-serve failed ({p.returncode}):\n{p.stderr}")
    return p


def test_generate_json_with_a_budget_matches_transformers(model_dir):
    d, hf = model_dir
    p = cli("generate", "--model", d, "--prompt-ids", "3,14,15,92,65", "--max-new-tokens", 10,
            "--memory-budget", "600KiB", "--cache-policy", "layer", "--device", "cpu", "--json")
    doc = json.loads(p.stdout)
    assert doc["token_ids"] == hf_greedy(hf, [3, 14, 15, 92, 65], 10)
    for key in ("tokens_per_s", "ttft_s", "expert_hit_rate", "prefetch_precision",
                "prefetch_recall", "bytes_to_device"):
        assert key in doc["stats"], key
    assert doc["stats"]["bytes_to_device"] > 0
    assert "600.00 KiB" in p.stderr and "expert slots" in p.stderr


def test_generate_with_cuda_graphs_runs_fixed_steps(model_dir):
    """--cuda-graphs with a budget for every expert: the same tokens, every expert loaded
    at the first decode step, saying so (the CPU runs the fixed-shape steps eagerly)."""
    d, hf = model_dir
    p = cli("generate", "--model", d, "--prompt-ids", "3,14,15", "--max-new-tokens", 8,
            "--device", "cpu", "--cuda-graphs", "--json")
    doc = json.loads(p.stdout)
    assert doc["token_ids"] == hf_greedy(hf, [3, 14, 15], 8)
    assert doc["stats"]["expert_hits"] > doc["stats"]["expert_misses"]
    assert "loading all 24 experts" in p.stderr  # once, at the first decode step


def test_generate_with_a_draft_model_speculates_four_unless_told(model_dir):
    """--draft-model (here the served model itself, a draft that never misses; every token
    drafted, however unsure) drafts 4 tokens a step when --speculate is not given:
    transformers' tokens in 3 steps for 10."""
    d, hf = model_dir
    p = cli("generate", "--model", d, "--prompt-ids", "3,14,15,92,65", "--max-new-tokens", 10,
            "--draft-model", d, "--draft-min-prob", 0, "--device", "cpu", "--json", "--quiet")
    doc = json.loads(p.stdout)
    assert doc["token_ids"] == hf_greedy(hf, [3, 14, 15, 92, 65], 10)
    assert doc["stats"]["drafted_tokens"] == doc["stats"]["accepted_tokens"] == 4 + 3
    assert doc["stats"]["steps"] == 3  # the prefill's token, then 5, then 4 (the limit)
    p = cli("generate", "--model", d, "--prompt-ids", "3,14", "--draft-model", d,
            "--speculate", "0", "--device", "cpu", check=False)
    assert p.returncode != 0 and "speculate" in p.stderr and "Traceback" not in p.stderr


def test_generate_with_low_precision_stand_ins(model_dir):
    """--miss-quant int4 --miss-quant-weight 1: light missing experts run from int4 copies
    (counted in the JSON stats, named on the summary line); without the weight, an error
    that names the pair."""
    d, _ = model_dir
    args = ("generate", "--model", d, "--prompt-ids", "3,14,15,92,65", "--max-new-tokens", 6,
            "--memory-budget", "600KiB", "--device", "cpu", "--miss-quant", "int4")
    doc = json.loads(cli(*args, "--miss-quant-weight", 1, "--json", "--quiet").stdout)
    assert len(doc["token_ids"]) == 6 and doc["stats"]["experts_low_precision"] > 0
    p = cli(*args, "--miss-quant-weight", 1, "--miss-quant-slots", 5)
    assert "5 int4 stand-in slots" in p.stderr
    p = cli(*args, "--miss-quant-weight", 1)
    assert "low-precision stand-ins" in p.stdout + p.stderr
    p = cli(*args, check=False)
    assert p.returncode != 0 and "go together" in p.stderr and "Traceback" not in p.stderr


def test_generate_names_withheld_prefetches(model_dir):
    """--prefetch-min-precision 1: no prediction is right often enough to be copied; the
    JSON stats count the withheld ones, the summary line says why nothing was prefetched."""
    d, hf = model_dir
    args = ("generate", "--model", d, "--prompt-ids", "3,14,15,92,65", "--max-new-tokens", 6,
            "--memory-budget", "600KiB", "--device", "cpu", "--prefetch-min-precision", 1)
    doc = json.loads(cli(*args, "--json", "--quiet").stdout)
    assert doc["token_ids"] == hf_greedy(hf, [3, 14, 15, 92, 65], 6)
    st = doc["stats"]
    assert st["prefetch_withheld"] > 0 and st["prefetch_copied"] == 0
    assert st["experts_prefetched"] == 0 and st["prefetch_precision"] > 0
    p = cli(*args)
    assert f"prefetch withheld for {st['prefetch_withheld']} of" in p.stderr


def test_generate_text_streams_the_decoded_completion(model_dir):
    d, hf = model_dir
    codec = TextCodec(d)
    prompt = "def add("
    ids = hf_greedy(hf, codec.encode(prompt), 12)
    p = cli("generate", "--model", d, "--prompt", prompt, "--max-new-tokens", 12,
            "--ignore-eos", "--quiet")
    assert p.stdout.strip() == codec.decode(ids).strip()
    assert "tok/s decode" in p.stderr


def test_bench_reports_speed_hits_and_utilisation(model_dir):
    d, _ = model_dir
    p = cli("bench", "--model", d, "--prompt-len", 16, "--new-tokens", 6, "--memory-budget",
            "600KiB", "--json", "--quiet")
    r = json.loads(p.stdout)
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert 0 < r["s_mbu"] and 0 < r["s_mfu"]
    assert 0 <= r["expert_hit_rate"] <= 1 and r["expert_slots"] < r["total_experts"]
    assert r["quant"] == "none"  # --quant auto on a float checkpoint
    assert r["experts_skipped_per_token"] == 0  # exact unless --skip-miss-weight
    # 3 layers x 2 KV heads x (key 8 + value 8) float32 values
    assert r["kv_cache_bytes_per_token"] == 3 * 2 * (8 + 8) * 4


def test_bench_lengths_fit_the_context_unless_given(model_dir):
    """Lengths left unset shrink to the model's context (64 here); lengths given that do not
    fit are refused naming the flags, with exit 2."""
    from serve.bench import fit_lengths

    assert fit_lengths(4096, None, None) == (128, 32)
    assert fit_lengths(64, None, None) == (48, 16)
    assert fit_lengths(64, 60, None) == (60, 4) and fit_lengths(64, None, 40) == (24, 40)
    assert fit_lengths(2, None, None) == (1, 1) and fit_lengths(64, 60, 4) == (60, 4)
    for lengths in ((60, 5), (64, None), (None, 64)):
        with pytest.raises(ValueError, match="--(prompt-len|new-tokens)"):
            fit_lengths(64, *lengths)
    d, _ = model_dir
    r = json.loads(cli("bench", "--model", d, "--json", "--quiet").stdout)
    assert (r["prompt_len"], r["new_tokens"]) == (48, 16)
    p = cli("bench", "--model", d, "--prompt-len", 60, "--new-tokens", 8, "--quiet", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--prompt-len 60 + --new-tokens 8 = 68 exceeds the context of 64" in p.stderr


def test_a_serve_config_preset_under_the_flags(model_dir, tmp_path):
    """--config FILE fills what the flags leave unset; a flag given wins; a name resolves to
    configs/serve/NAME.yaml."""
    d, hf = model_dir
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"model: {d}\nmemory_budget: 600KiB\ncache_policy: lfu\n"
                      "prefetch: none\ndevice: cpu\nprefetch_min_weight: 0.5\n")
    p = cli("bench", "--config", preset, "--cache-policy", "layer", "--prompt-len", 8,
            "--prefetch-min-weight", 0.25, "--prefetch-min-precision", 0.5,
            "--new-tokens", 3, "--json", "--quiet")
    r = json.loads(p.stdout)
    assert (r["cache_policy"], r["prefetch"]) == ("layer", "none")
    assert r["prefetch_min_weight"] == 0.25 and r["memory_budget"] == "600KiB"
    assert r["prefetch_min_precision"] == 0.5
    assert r["expert_slots"] < r["total_experts"]  # the preset's budget
    p = cli("generate", "--config", "cpu", "--model", d, "--prompt-ids", "3,14,15",
            "--max-new-tokens", 6, "--json")
    assert json.loads(p.stdout)["token_ids"] == hf_greedy(hf, [3, 14, 15], 6)
    p = cli("generate", "--config", preset.with_name("none.yaml"), "--prompt-ids", "1",
            check=False)
    assert p.returncode == 2 and "neither a file nor one of configs/serve/" in p.stderr
    assert "gpu_24gib" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("text,message", [
    ("cache_polcy: lru\n", "unknown key 'cache_polcy'"),
    ("max_batch: four\n", "max_batch must be an integer"),
    ("prefetch_min_weight: high\n", "prefetch_min_weight must be a number"),
    ("prefetch_min_precision: 1.5\n", "prefetch_min_precision must be a number in"),
    ("prefill_step_tokens: 0\n", "prefill_step_tokens must be >= 1"),
    ("prefill_step_tokens: all\n", "prefill_step_tokens must be an integer"),
    ("memory_budget: [1, 2]\n", "memory_budget must be a string"),
    ("- device\n", "a mapping of ServeConfig fields"),
    ("device: [\n", "not a readable YAML"),
])
def test_bad_serve_configs_are_named(tmp_path, text, message):
    from serve.config import read_serve_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        read_serve_config(str(tmp_path / "c.yaml"))


def test_every_shipped_serve_preset_reads_and_checks():
    from serve.config import SERVE_CONFIGS, read_serve_config

    names = sorted(p.stem for p in SERVE_CONFIGS.glob("*.yaml"))
    assert {"cpu", "gpu_24gib"} <= set(names)
    for name in names:
        ServeConfig(**{"model": "m", **read_serve_config(name)}).check()


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model", "--prompt-ids", "1"], "does not exist"),
    (["--model", "", "--prompt-ids", "1"], "no model directory"),
    (["--prompt-ids", "1,2", "--memory-budget", "1KiB"], "too small"),
    (["--prompt-ids", "1,2", "--memory-budget", "12XB"], "invalid size"),
    (["--prompt-ids", ",".join(["5"] * 70)], "longer than the context"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    ([], "--prompt TEXT or as --prompt-ids"),
])
def test_generate_errors_exit_non_zero_with_a_message(model_dir, args, message):
    d, _ = model_dir
    if "--model" not in args:
        args = ["--model", d, *args]
    p = cli("generate", *args, "--max-new-tokens", 2, check=False)
    assert p.returncode != 0
    assert message in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("command,flags,message", [
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    ("generate", ["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    ("generate", ["--temperature", "-1"], "temperature must be >= 0"),
    ("generate", ["--response-format", "/nonexistent/schema.json"], "neither 'json' nor"),
    ("chat", ["--prediction-file", "/nonexistent/draft.py"], "no such file"),
    ("chat", ["--presence-penalty", "3"], "presence_penalty must be in [-2, 2]"),
    ("bench", ["--new-tokens", "0"], "--new-tokens: must be >= 1, got 0"),
    ("bench", ["--prompt-len", "-3"], "--prompt-len: must be >= 1, got -3"),
    ("http", ["--port", "99999"], "a TCP port is 0-65535, got 99999"),
    ("http", ["--port", "in use"], "Address already in use"),
])
def test_sampling_flags_are_refused_before_the_model_loads(model_dir, command, flags,
                                                          message):
    """A flag out of range, or a port that cannot be listened on, stops the run at once: no
    model is read first (the load's line, which names the architecture, is never printed)."""
    d, _ = model_dir
    extra = ["--prompt-ids", "1"] if command == "generate" else []
    with socket.socket() as taken:  # a port something else listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = [str(taken.getsockname()[1]) if f == "in use" else f for f in flags]
        p = cli(command, "--model", d, *extra, *flags, check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "mixtral" not in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.fixture(scope="module")
def server(model_dir):
    d, hf = model_dir
    session = Session(ServeConfig(model=str(d), memory_budget="600KiB", max_context=64,
                                  dtype="float32"))
    with serving(session) as srv:
        yield srv.url, session, hf


def test_http_health_models_and_completions(server):
    base, session, hf = server
    assert request(base + "/health") == (200, '{"status": "ok"}')
    code, body = request(base + "/v1/models")
    assert code == 200 and json.loads(body)["data"][0]["id"] == session.name
    assert json.loads(body)["data"][0]["max_model_len"] == 64  # as vLLM gives it
    ids = session.codec.encode("import os")
    code, body = request(base + "/v1/completions", {"prompt": "import os", "max_tokens": 8,
                                                    "temperature": 0})
    assert code == 200, body
    doc = json.loads(body)
    want = hf_greedy(hf, ids, 8)
    eos = session.codec.stop_ids
    want = want[:next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert doc["choices"][0]["text"] == session.codec.decode(want)
    assert doc["usage"]["prompt_tokens"] == len(ids)
    assert doc["object"] == "text_completion"


def test_http_chat_completion_and_stream(server):
    base, session, _ = server
    body = {"messages": [{"role": "user", "content": "print"}], "max_tokens": 6,
            "temperature": 0}
    code, plain = request(base + "/v1/chat/completions", body)
    assert code == 200, plain
    doc = json.loads(plain)
    assert doc["object"] == "chat.completion"
    content = doc["choices"][0]["message"]["content"]
    code, streamed = request(base + "/v1/chat/completions", dict(body, stream=True))
    assert code == 200
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == content
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("path,raw,fragment", [
    ("/v1/completions", b"{not json", "malformed JSON"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", b'{"max_tokens": 4}', "'prompt'"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', "'max_tokens'"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 9}', "'temperature'"),
    ("/v1/completions", json.dumps({"prompt": list(range(1, 80))}).encode(),
     "longer than the context"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"echo": true}', "'echo' is a completions field"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "0 only with"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 99}', "'logprobs'"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"top_logprobs": 2}', "needs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"presence_penalty": 2.5}', "'presence_penalty' has an invalid value"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"a": 1}}', "'logit_bias' keys"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"3": 200}}', "in [-100, 100]"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"999999": 1}}',
     "not in the vocabulary"),
    ("/v1/completions", b'{"prompt": "x", "best_of": 3, "stream": true}', "cannot stream"),
    ("/v1/completions", b'{"prompt": "x", "min_tokens": 99}', "'min_tokens'"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
     b'"response_format": {"type": "regex"}}', "type 'regex' is not supported"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "'messages'"),
    ("/v1/chat/completions", b'{"messages": [{"text": "hi"}]}', "'role'"),
])
def test_http_bad_requests_get_400(server, path, raw, fragment):
    base, _, _ = server
    code, body = request(base + path, raw=raw)
    assert code == 400, body
    assert fragment in json.loads(body)["error"]["message"]


def test_http_accepts_neutral_values_of_unsupported_fields_and_streams_usage(server):
    """What OpenAI clients send by default (null logprobs, zero penalties, ...) is accepted;
    stream_options.include_usage adds a last chunk with the usage."""
    base, _, _ = server
    body = {"prompt": "def f", "max_tokens": 5, "temperature": 0, "logprobs": None,
            "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1,
            "logit_bias": {}}
    code, plain = request(base + "/v1/completions", body)
    assert code == 200, plain
    usage = json.loads(plain)["usage"]
    code, streamed = request(base + "/v1/completions",
                             dict(body, stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(line[6:]) for line in streamed.splitlines()
              if line.startswith("data: {")]
    # the same prompt again: its KV row holds all of it but the last token
    cached = {"prompt_tokens_details": {"cached_tokens": usage["prompt_tokens"] - 1}}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == dict(usage, **cached)
    assert all("usage" not in c for c in chunks[:-1])


def test_http_logprobs_are_the_models_as_transformers_computes_them(server):
    """Completions "logprobs": N and chat "logprobs": true / "top_logprobs": N: each new
    token's log-probability and the N likeliest, equal to log_softmax of transformers'
    logits over the same tokens."""
    base, session, hf = server
    code, plain = request(base + "/v1/completions", {"prompt": "def f", "max_tokens": 6,
                                                     "temperature": 0, "logprobs": 3})
    assert code == 200, plain
    lp = json.loads(plain)["choices"][0]["logprobs"]
    prompt = session.codec.encode("def f")
    want, _ = session.complete([prompt], 6)
    new = want[0].token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1].float()
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"]),
                               ref[range(len(new)), new], rtol=1e-4, atol=1e-4)
    assert lp["tokens"] == [session.codec.tok.decode([t], skip_special_tokens=False)
                            for t in new]
    for top, row, t in zip(lp["top_logprobs"], ref, new, strict=True):
        # keyed by token text: alternatives that decode alike (partial bytes) share a key
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(row[t].item(), abs=1e-4)
    assert lp["text_offset"][0] == 0
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    code, plain = request(base + "/v1/chat/completions", body)
    assert code == 200, plain
    choice = json.loads(plain)["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == json.loads(plain)["usage"]["completion_tokens"]
    for c in content:  # greedy: the token taken is the likeliest
        assert len(c["top_logprobs"]) == 2 and c["logprob"] <= 0
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"])
        assert c["bytes"] == list(c["token"].encode())
    code, plain = request(base + "/v1/chat/completions", dict(body, logprobs=False,
                                                              top_logprobs=None))
    assert json.loads(plain)["choices"][0]["logprobs"] is None


def test_prompt_logprobs_across_prefill_chunks_match_transformers(model_dir):
    """Each prompt token's log-probability after those before it (None for the first), the
    prompt read in chunks of 3 tokens, with 2 alternatives each."""
    d, hf = model_dir
    session = Session(ServeConfig(model=str(d), prefill_chunk=3, dtype="float32"))
    prompt = session.codec.encode("def add(a, b):\n    return")
    assert len(prompt) > 6
    out, _ = session.complete([prompt], 1, SamplingConfig(logprobs=2, prompt_logprobs=True))
    got = out[0].prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got[1:]]),
                               ref[range(len(prompt) - 1), prompt[1:]], rtol=1e-4, atol=1e-4)
    for (_, alts), row in zip(got[1:], ref, strict=True):
        want = row.topk(2)
        assert [a for a, _ in alts] == want.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in alts]), want.values,
                                   rtol=1e-4, atol=1e-4)


def test_http_echo_scores_a_prompt_as_transformers_does(server):
    """"echo": true, "max_tokens": 0, "logprobs": 1 (how evaluation harnesses score a
    continuation): the prompt's tokens, their log-probabilities (None for the first) and the
    likeliest token at each, nothing generated."""
    base, session, hf = server
    prompt = "def add(a, b):"
    code, plain = request(base + "/v1/completions", {"prompt": prompt, "max_tokens": 0,
                                                     "echo": True, "logprobs": 1})
    assert code == 200, plain
    doc = json.loads(plain)
    choice = doc["choices"][0]
    ids = session.codec.encode(prompt)
    assert choice["text"] == prompt and doc["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]),
                               ref[range(len(ids) - 1), ids[1:]], rtol=1e-4, atol=1e-4)
    for top, row in zip(lp["top_logprobs"][1:], ref, strict=True):
        assert list(top.values())[0] == pytest.approx(row.max().item(), abs=1e-4)
    # another continuation of the context takes its scored tokens from the row it left
    longer = session.codec.encode(prompt + " return a")
    code, plain = request(base + "/v1/completions", {"prompt": longer, "max_tokens": 0,
                                                     "echo": True, "logprobs": 1})
    doc = json.loads(plain)
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids) - 1
    with torch.no_grad():
        ref = hf(torch.tensor([longer])).logits[0, :-1].float().log_softmax(-1)
    torch.testing.assert_close(torch.tensor(doc["choices"][0]["logprobs"]["token_logprobs"][1:]),
                               ref[range(len(longer) - 1), longer[1:]], rtol=1e-4, atol=1e-4)
    # echo with new tokens: the prompt, then the completion; logprobs run on into it
    code, plain = request(base + "/v1/completions", {"prompt": prompt, "max_tokens": 3,
                                                     "echo": True, "logprobs": 0,
                                                     "temperature": 0})
    choice = json.loads(plain)["choices"][0]
    want, _ = session.complete([ids], 3)
    assert choice["text"] == prompt + want[0].text
    assert len(choice["logprobs"]["tokens"]) == len(ids) + len(want[0].token_ids)


def _chunks(streamed: str) -> list[dict]:
    return [json.loads(line[6:]) for line in streamed.splitlines()
            if line.startswith("data: {")]


def _close(got, want, tol: float = 1e-5) -> bool:
    """got and want alike in structure, keys and every non-float; floats within tol (the
    second request of a prompt reads its prefix from the KV cache: last-bit differences)."""
    if isinstance(want, float):
        return isinstance(got, float) and abs(got - want) <= tol
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and \
            all(_close(got[k], want[k], tol) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and \
            all(_close(a, b, tol) for a, b in zip(got, want, strict=True))
    return got == want


def test_http_streams_logprobs_beside_their_tokens(server):
    """"logprobs" with "stream": each chunk carries the log-probabilities of the tokens since
    the last one (a token's before or with its text); together they are the non-streamed
    answer's, text offsets running across chunks, in both OpenAI forms."""
    base, _, _ = server
    body = {"prompt": "def f", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    code, plain = request(base + "/v1/completions", body)
    assert code == 200, plain
    want = json.loads(plain)["choices"][0]
    code, streamed = request(base + "/v1/completions", dict(body, stream=True))
    assert code == 200, streamed
    choices = [c["choices"][0] for c in _chunks(streamed)]
    assert "".join(c["text"] for c in choices) == want["text"]
    got = {k: [x for c in choices for x in c["logprobs"][k]] for k in want["logprobs"]}
    assert _close(got, want["logprobs"])
    first = next(c for c in choices if c["text"])
    assert first["logprobs"]["tokens"]  # the text came with its token's log-probability
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    code, plain = request(base + "/v1/chat/completions", chat)
    want = json.loads(plain)["choices"][0]["logprobs"]["content"]
    code, streamed = request(base + "/v1/chat/completions", dict(chat, stream=True))
    choices = [c["choices"][0] for c in _chunks(streamed)]
    assert choices[0]["logprobs"] is None  # the role chunk: no token yet
    assert _close([x for c in choices[1:] for x in c["logprobs"]["content"]], want)
    code, streamed = request(base + "/v1/chat/completions",
                             dict(chat, stream=True, logprobs=False, top_logprobs=None))
    assert all("logprobs" not in c["choices"][0] for c in _chunks(streamed))


def test_http_streamed_echo_sends_the_prompt_first(server):
    """"echo" with "stream": the first chunk is the prompt (with its log-probabilities when
    asked), then the completion; "max_tokens": 0 streams the prompt's scores alone."""
    base, _, _ = server
    prompt = "def add(a, b):"
    for extra in ({"max_tokens": 3}, {"max_tokens": 3, "logprobs": 1}, {"max_tokens": 0,
                                                                      "logprobs": 1}):
        body = dict({"prompt": prompt, "echo": True, "temperature": 0}, **extra)
        code, plain = request(base + "/v1/completions", body)
        assert code == 200, plain
        want = json.loads(plain)
        code, streamed = request(base + "/v1/completions",
                                 dict(body, stream=True, stream_options={"include_usage": True}))
        assert code == 200, streamed
        chunks = _chunks(streamed)
        choices = [c["choices"][0] for c in chunks[:-1]]
        assert choices[0]["text"] == prompt
        assert "".join(c["text"] for c in choices) == want["choices"][0]["text"]
        assert choices[-1]["finish_reason"] == want["choices"][0]["finish_reason"]
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert [chunks[-1]["usage"][k] for k in counts] == [want["usage"][k] for k in counts]
        lp = want["choices"][0]["logprobs"]
        if lp is None:
            assert all(c["logprobs"] is None for c in choices)
        else:  # the stream takes the scored prompt the first request left (float noise)
            got = {k: [x for c in choices for x in c["logprobs"][k]] for k in lp}
            assert got["tokens"] == lp["tokens"] and got["text_offset"] == lp["text_offset"]
            assert got["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)
            for g, w in zip(got["top_logprobs"], lp["top_logprobs"], strict=True):
                assert g == w if w is None else g == pytest.approx(w, abs=1e-5)


def test_http_next_chat_turn_reads_only_what_is_new(server):
    """The next turn's prompt begins with the last turn's (the template renders the answer
    after it): the KV row holds that, so usage counts it as cached_tokens, and the answer
    is still transformers' greedy one."""
    base, session, hf = server
    msgs = [{"role": "user", "content": "print"}]
    body = {"messages": msgs, "max_tokens": 5, "temperature": 0}
    code, plain = request(base + "/v1/chat/completions", body)
    assert code == 200, plain
    answer = json.loads(plain)["choices"][0]["message"]["content"]
    msgs = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "x"}]
    code, plain = request(base + "/v1/chat/completions", dict(body, messages=msgs))
    assert code == 200, plain
    doc = json.loads(plain)
    first = session.codec.encode_chat(msgs[:1])
    ids = session.codec.encode_chat(msgs)
    assert ids[:len(first)] == first
    assert len(first) <= doc["usage"]["prompt_tokens_details"]["cached_tokens"] < len(ids)
    want = hf_greedy(hf, ids, 5)
    eos = session.codec.stop_ids
    want = want[:next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert doc["choices"][0]["message"]["content"] == session.codec.decode(want)


def test_http_penalties_and_logit_bias_reach_the_sampler(server):
    """OpenAI's presence / frequency penalties and logit_bias (and the repetition_penalty
    extension) sample as the runtime does with the same settings."""
    base, session, _ = server
    ids = session.codec.encode("def f")
    body = {"prompt": "def f", "max_tokens": 6, "temperature": 0, "presence_penalty": 1.0,
            "frequency_penalty": 0.5, "repetition_penalty": 1.3}
    code, plain = request(base + "/v1/completions", body)
    assert code == 200, plain
    want, _ = session.complete([ids], 6, SamplingConfig(presence_penalty=1.0,
                                                        frequency_penalty=0.5,
                                                        repetition_penalty=1.3))
    assert json.loads(plain)["choices"][0]["text"] == want[0].text
    code, plain = request(base + "/v1/completions", {"prompt": "def f", "max_tokens": 3,
                                                     "temperature": 0,
                                                     "logit_bias": {"65": 100}})
    assert code == 200, plain
    assert json.loads(plain)["choices"][0]["text"] == session.codec.decode([65] * 3)


def test_http_default_max_tokens_16_for_completions_the_context_for_chat(server):
    """OpenAI's defaults: a completion without max_tokens takes 16 new tokens, a chat answer
    runs to the end of the context."""
    base, session, _ = server
    code, doc = request(base + "/v1/completions", {"prompt": "def f", "temperature": 0,
                                                   "ignore_eos": True})
    assert code == 200 and json.loads(doc)["usage"]["completion_tokens"] == 16
    code, doc = request(base + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "ignore_eos": True})
    assert code == 200, doc
    doc = json.loads(doc)
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["total_tokens"] == session.model.max_context


def test_http_min_tokens_ignore_eos_and_best_of(server):
    """With the stop token biased to be drawn at once: min_tokens holds it back that many
    tokens, ignore_eos runs to max_tokens. best_of 3 keeps the candidate of the highest mean
    log-probability per token (usage counts all three)."""
    base, session, _ = server
    eos = min(session.codec.stop_ids)
    body = {"prompt": "def f", "max_tokens": 6, "temperature": 0,
            "logit_bias": {str(eos): 100}}
    for extra, tokens, finish in (({}, 1, "stop"), ({"min_tokens": 3}, 4, "stop"),
                                  ({"ignore_eos": True}, 6, "length")):
        code, plain = request(base + "/v1/completions", dict(body, **extra))
        assert code == 200, plain
        doc = json.loads(plain)
        assert doc["usage"]["completion_tokens"] == tokens, extra
        assert doc["choices"][0]["finish_reason"] == finish
    ids = session.codec.encode("def f")
    body = {"prompt": "def f", "max_tokens": 5, "temperature": 1.0, "seed": 5, "best_of": 3}
    code, plain = request(base + "/v1/completions", body)
    assert code == 200, plain
    doc = json.loads(plain)
    # candidate i draws with seed 5 + i, as prompt i of a batch seeded 5 does
    cands, _ = session.complete([ids] * 3, 5, SamplingConfig(temperature=1.0, seed=5,
                                                             logprobs=0))
    best = max(cands, key=lambda o: sum(lp for lp, _ in o.logprobs) / len(o.logprobs))
    assert [c["text"] for c in doc["choices"]] == [best.text]
    assert doc["choices"][0]["logprobs"] is None  # not asked: only the ranking used them
    assert doc["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in cands)
    code, plain = request(base + "/v1/completions", dict(body, n=4))
    assert code == 400 and "'best_of'" in json.loads(plain)["error"]["message"]


def test_http_suffix_fills_in_the_middle(server, model_dir, tmp_path):
    """"suffix": the prompt becomes the model's fill-in-the-middle form (prefix, hole,
    suffix, middle tokens), answered as that prompt is; a model without such tokens is a
    400 that says so."""
    base, _, _ = server
    code, plain = request(base + "/v1/completions", {"prompt": "def f", "suffix": "\n"})
    assert code == 400 and "fill-in-the-middle" in json.loads(plain)["error"]["message"]
    fim = tmp_path / "fim"
    shutil.copytree(model_dir[0], fim)
    marks = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    save_tokenizer(fim, CODE_TEXTS, special=marks)
    session = Session(ServeConfig(model=str(fim), max_context=64, dtype="float32"))
    ids = session.codec.fill_in_middle("def add(a, b):\n    ", "\n")
    begin, hole, middle = (session.codec.tok.token_to_id(m) for m in marks)
    assert ids[0] == begin and ids[-1] == middle and ids.count(hole) == 1
    want, _ = session.complete([ids], 4)
    with serving(session) as srv:
        code, plain = request(srv.url + "/v1/completions",
                              {"prompt": "def add(a, b):\n    ", "suffix": "\n",
                               "max_tokens": 4, "temperature": 0})
    assert code == 200, plain
    assert json.loads(plain)["choices"][0]["text"] == want[0].text


def test_http_completions_take_several_prompts(server):
    """A list of prompts (texts or id lists): n choices each, numbered prompt by prompt."""
    base, session, _ = server
    texts = ["def f", "import os"]
    ids = [session.codec.encode(t) for t in texts]
    want, _ = session.complete(ids, 4)
    for prompt in (texts, ids):
        code, plain = request(base + "/v1/completions", {"prompt": prompt, "max_tokens": 4,
                                                         "temperature": 0, "n": 2})
        assert code == 200, plain
        doc = json.loads(plain)
        assert [c["index"] for c in doc["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in doc["choices"]] == [want[0].text] * 2 + [want[1].text] * 2
        assert doc["usage"]["prompt_tokens"] == sum(map(len, ids))
    # streamed: the same choices, chunks of each by its index, echoed prompts first
    code, streamed = request(base + "/v1/completions", {"prompt": texts, "max_tokens": 4,
                                                        "temperature": 0, "n": 2,
                                                        "echo": True, "stream": True})
    assert code == 200, streamed
    choices = [c["choices"][0] for c in _chunks(streamed)]
    assert ["".join(c["text"] for c in choices if c["index"] == i) for i in range(4)] == [
        texts[0] + want[0].text] * 2 + [texts[1] + want[1].text] * 2
    assert [c["text"] for c in choices[:4]] == [texts[0]] * 2 + [texts[1]] * 2


def test_http_n_choices_draw_each_with_its_own_seed(server):
    base, session, _ = server
    body = {"prompt": "def f", "max_tokens": 6, "temperature": 0.9, "seed": 11, "n": 3}
    code, plain = request(base + "/v1/completions", body)
    assert code == 200, plain
    doc = json.loads(plain)
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in doc["choices"]]
    # choice i draws with seed 11 + i, as prompt i of a batch seeded 11 does
    want, _ = session.complete([session.codec.encode("def f")] * 3, 6,
                               SamplingConfig(temperature=0.9, seed=11))
    assert texts == [w.text for w in want]
    assert doc["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
    code, streamed = request(base + "/v1/completions", dict(body, stream=True))
    assert code == 200
    events = [json.loads(line[6:]) for line in streamed.splitlines()
              if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events]
    assert ["".join(c["text"] for c in choices if c["index"] == i) for i in range(3)] == texts
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1, 2]
    code, body = request(base + "/v1/completions", dict(body, n=17))
    assert code == 400 and "'n'" in json.loads(body)["error"]["message"]


def test_http_tokenize_and_detokenize(server):
    """vLLM's /tokenize (text, or a chat through its template) and /detokenize."""
    base, session, _ = server
    code, plain = request(base + "/tokenize", {"prompt": "def f"})
    assert code == 200, plain
    doc = json.loads(plain)
    assert doc["tokens"] == session.codec.encode("def f") and doc["count"] == len(doc["tokens"])
    assert doc["max_model_len"] == session.model.max_context
    msgs = [{"role": "user", "content": "hi"}]
    code, plain = request(base + "/tokenize", {"messages": msgs})
    assert json.loads(plain)["tokens"] == session.codec.encode_chat(msgs)
    code, plain = request(base + "/detokenize", {"tokens": doc["tokens"]})
    assert code == 200 and json.loads(plain) == {"prompt": "def f"}
    for path, body in (("/detokenize", {"tokens": "x"}), ("/tokenize", {"text": "x"})):
        code, plain = request(base + path, body)
        assert code == 400, plain


def test_http_unknown_route_is_404(server):
    base, _, _ = server
    assert request(base + "/v2/nothing")[0] == 404


def test_http_metrics_count_requests_tokens_and_expert_traffic(model_dir):
    """GET /metrics (Prometheus text): requests by finish reason, tokens, time histograms,
    and the runtime's counts since load, which reset_stats (a benchmark's) does not lower."""
    from prometheus_client.parser import text_string_to_metric_families

    d, _ = model_dir
    session = Session(ServeConfig(model=str(d), memory_budget="600KiB", max_context=64,
                                  dtype="float32"))
    with serving(session) as srv:
        def scrape() -> dict:
            code, text = request(srv.url + "/metrics")
            assert code == 200
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}

        m = scrape()
        assert m[("moe_serve_expert_slots", ())] == session.model.n_slots
        assert m[("moe_serve_bytes_to_device_total", ())] == 0
        usage = []
        for body in ({"prompt": "import os", "max_tokens": 5, "temperature": 0,
                      "ignore_eos": True},
                     {"prompt": "def f", "max_tokens": 3, "temperature": 0, "ignore_eos": True}):
            code, doc = request(srv.url + "/v1/completions", body)
            assert code == 200, doc
            usage.append(json.loads(doc)["usage"])
        m = scrape()
        assert m[("moe_serve_requests_total", (("finish_reason", "length"),))] == 2
        assert m[("moe_serve_generation_tokens_total", ())] == 5 + 3
        assert m[("moe_serve_prompt_tokens_total", ())] == sum(u["prompt_tokens"]
                                                               for u in usage)
        assert m[("moe_serve_time_to_first_token_seconds_count", ())] == 2
        assert m[("moe_serve_requests_running", ())] == 0
        moved = session.model.total_counters()["bytes_to_device"]
        assert m[("moe_serve_bytes_to_device_total", ())] == moved > 0
        assert m[("moe_serve_expert_hits_total", ())] + m[
            ("moe_serve_expert_misses_total", ())] > 0
        c = session.model.total_counters()
        assert m[("moe_serve_prefetch_copied_total", ())] == c["copied"]
        assert m[("moe_serve_prefetch_withheld_total", ())] == c["withheld"]
        assert c["copied"] + c["withheld"] > 0
        session.model.reset_stats()
        assert scrape()[("moe_serve_bytes_to_device_total", ())] == moved


def test_stop_strings_cut_the_text_and_end_the_row(server):
    _, session, _ = server
    ids = session.codec.encode("class Point")
    full, _ = session.complete([ids], 12, SamplingConfig(ignore_eos=True))
    text = full[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = text[:text.index(stop)]
    streamed = []
    out, _ = session.complete([ids], 12, SamplingConfig(ignore_eos=True), stop=[stop],
                              on_text=lambda row, t: streamed.append(t))
    assert out[0].text == cut and out[0].finish_reason == "stop"
    assert "".join(streamed) == cut


def test_chat_template_from_the_tokenizer_config(model_dir):
    d, _ = model_dir
    codec = TextCodec(d)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert codec.render_chat(msgs) == "<system>be brief\n<user>hi\n<assistant>"
    assert codec.encode_chat(msgs) == codec.encode("<system>be brief\n<user>hi\n<assistant>",
                                                   add_special_tokens=False)


def test_chat_templates_render_as_transformers_renders_them(model_dir, tmp_path):
    """Loop controls, strftime_now, tojson and a chat_template.jinja file (which wins over
    tokenizer_config.json), against transformers' apply_chat_template."""
    d, _ = model_dir
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / f, tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ strftime_now('%Y') }}|{% for m in messages %}{% if m['role'] == 'stop' %}"
        "{% break %}{% endif %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [{"role": "user", "content": "hé \"x\""}, {"role": "skip", "content": "-"},
            {"role": "assistant", "content": "ok"}, {"role": "stop", "content": ""},
            {"role": "user", "content": "never"}]
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    assert TextCodec(tmp_path).render_chat(msgs) == ref
    assert ref.endswith('<user>"hé \\"x\\""<assistant>"ok"<assistant>')


def test_chat_reads_stdin_and_answers_through_the_template(model_dir):
    """Two turns (the second reads only what is new: prefix reuse); the same answers with
    --no-prefix-cache."""
    d, _ = model_dir
    outs = []
    for extra in ([], ["--no-prefix-cache"]):
        p = subprocess.run([sys.executable, "-m", "serve", "chat", "--model", str(d),
                            "--max-new-tokens", "4", "--quiet", "--dtype", "float32", *extra],
                           input="hello\nhow are you\n\n", capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("> ") == 3  # two answered turns, then the empty line ends it
        outs.append(p.stdout)
    assert outs[0] == outs[1]


def test_http_decodes_four_rows_unless_told(model_dir, monkeypatch):
    """`moe-serve http` batches 4 concurrent requests by default; --max-batch sets it."""
    import serve.cli as cli
    import serve.http as http

    d, _ = model_dir
    seen = []
    monkeypatch.setattr(http, "serve_forever", lambda s, *a: seen.append(s.model.max_batch))
    for extra in ([], ["--max-batch", "2"]):
        args = cli.build_parser().parse_args(["http", "--model", str(d), "--quiet",
                                              "--dtype", "float32", *extra])
        args.func(args)
    assert seen == [cli.HTTP_BATCH, 2] == [4, 2]


def test_a_directory_without_tokenizer_json_says_how_to_write_one(tmp_path):
    """A sentencepiece-only directory (ERNIE-4.5's, Mixtral's oldest) is told how
    transformers writes its tokenizer.json; another is told to pass token ids."""
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json: pass token ids \("):
        TextCodec(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="AutoTokenizer.from_pretrained"):
        TextCodec(tmp_path)


def _call(url: str, method: str = "GET", body: dict | None = None, **headers):
    """(status, headers, body text) of a request with these headers."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def test_http_api_key_guards_the_v1_routes_and_cors_is_opt_in(model_dir):
    """With an API key the /v1 routes answer 401 (an OpenAI error, WWW-Authenticate) unless
    the request carries it as a bearer token; /health stays open. Allowed origins get the
    CORS headers and preflights; a server without them sends none and refuses OPTIONS."""
    d, _ = model_dir
    session = Session(ServeConfig(model=str(d), memory_budget="600KiB", max_context=64,
                                  dtype="float32"))
    body = {"prompt": [3, 14, 15], "max_tokens": 2}
    with serving(session, api_key="sekret", origins=("http://ui.example",)) as srv:
        code, head, text = _call(srv.url + "/v1/completions", "POST", body)
        assert code == 401 and head["WWW-Authenticate"] == "Bearer"
        assert json.loads(text)["error"]["type"] == "authentication_error"
        code, _, text = _call(srv.url + "/v1/models", Authorization="Bearer wrong")
        assert code == 401 and "not this server's" in text
        code, _, text = _call(srv.url + "/v1/completions", "POST", body,
                              Authorization="Bearer sekret")
        assert code == 200 and len(json.loads(text)["choices"]) == 1
        assert _call(srv.url + "/health")[0] == 200
        code, head, _ = _call(srv.url + "/health", Origin="http://ui.example")
        assert head["Access-Control-Allow-Origin"] == "http://ui.example"
        assert "Access-Control-Allow-Origin" not in _call(srv.url + "/health",
                                                          Origin="http://evil.example")[1]
        code, head, _ = _call(srv.url + "/v1/chat/completions", "OPTIONS",
                              Origin="http://ui.example")
        assert code == 204 and "POST" in head["Access-Control-Allow-Methods"]
        assert "Authorization" in head["Access-Control-Allow-Headers"]
    with serving(session) as srv:  # the defaults: open, no cross-origin access
        code, head, _ = _call(srv.url + "/v1/models", Origin="http://ui.example")
        assert code == 200 and "Access-Control-Allow-Origin" not in head
        assert _call(srv.url + "/v1/models", "OPTIONS", Origin="http://ui.example")[0] == 405


def test_http_access_flags_and_environment(monkeypatch):
    from serve.cli import http_access

    monkeypatch.delenv("MOE_SERVE_API_KEY", raising=False)
    assert http_access(None, None) == (None, ())
    monkeypatch.setenv("MOE_SERVE_API_KEY", "from-env")
    assert http_access(None, "http://a.example, *") == ("from-env", ("http://a.example", "*"))
    assert http_access("flag", "")[0] == "flag" and http_access("", None)[0] is None


def test_plan_says_what_a_budget_buys_before_loading(model_dir):
    """moe-serve plan: the runtime's own slots and fixed bytes, a token's expert bytes cold
    and with the cached share, the PCIe bound at the bandwidth given; a budget too small is
    refused by name."""
    from serve.runtime import OffloadedModel

    d, _ = model_dir
    args = ("plan", "--model", d, "--memory-budget", "600KiB", "--device", "cpu")
    doc = json.loads(cli(*args, "--pcie-gbps", 10, "--json").stdout)
    m = OffloadedModel(ServeConfig(model=str(d), memory_budget="600KiB", device="cpu"))
    assert (doc["expert_slots"], doc["fixed_bytes"]) == (m.n_slots, m.fixed_bytes)
    cold = doc["top_k"] * doc["moe_layers"] * m.store.expert_nbytes
    assert doc["bytes_per_token_cold"] == cold
    expected = cold * (1 - m.n_slots / m.store.total_experts)
    assert doc["bytes_per_token_expected"] == pytest.approx(expected)
    assert doc["pcie_bound_tokens_per_s"] == pytest.approx(10e9 / expected)
    text = cli(*args).stdout
    assert f"{m.n_slots}/{m.store.total_experts} expert slots" in text
    assert "PCIe bound at 25.0 GB/s (assumed)" in text
    bad = cli("plan", "--model", d, "--memory-budget", "1KiB", "--device", "cpu", check=False)
    assert bad.returncode != 0 and "too small" in bad.stderr and "Traceback" not in bad.stderr
    rows = json.loads(cli(*args, "--compare", "--json").stdout)  # packed experts: more slots
    assert [r["quant"] for r in rows] == ["none", "int8", "int4"]
    assert rows[0]["expert_slots"] < rows[1]["expert_slots"] <= rows[2]["expert_slots"]
    assert rows[0]["expert_slots"] == m.n_slots
    assert "| int8 |" in cli(*args, "--compare").stdout
    from serve.store import WeightStore  # what plan opens: one expert read, none quantized

    probe = WeightStore(d, quant="int8", host_budget=0, tiers=False)
    assert not probe.host and not probe._offload and probe.n_disk == probe.total_experts
    assert probe.expert(probe.moe_layers[-1], 1).w_in.bits == 8  # read when asked


def test_convert_writes_an_fp8_copy_that_a_budget_holds_more_of(model_dir, tmp_path):
    """moe-serve convert: an FP8 block-scaled copy with progress and a summary, which plan
    and generate take with its experts FP8 (more slots in the same budget); a quantized
    source, an occupied --out, a missing model and a bad block are refused by name."""
    d, _ = model_dir
    out = tmp_path / "fp8"
    p = cli("convert", "--model", d, "--out", out, "--block", "8x8")
    assert "linear weights as e4m3 in 8x8 blocks" in p.stdout and "shard 1/1" in p.stderr
    assert "stay FP8 in RAM, on the wire and in their slots" in p.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "weight_block_size"] == [8, 8]
    wide = cli("convert", "--model", d, "--out", tmp_path / "wide", "--block", "16,16")
    assert "widened when read" in wide.stdout and "not multiples of its block" in wide.stdout
    assert (out / "tokenizer.json").exists()
    plans = [json.loads(cli("plan", "--model", m, "--memory-budget", "600KiB", "--device",
                            "cpu", "--json").stdout) for m in (d, out)]
    assert plans[1]["quant"] == "fp8" and plans[1]["expert_slots"] > plans[0]["expert_slots"]
    gen = json.loads(cli("generate", "--model", out, "--prompt-ids", "3,14,15,92,65",
                         "--max-new-tokens", 6, "--memory-budget", "600KiB", "--device", "cpu",
                         "--json").stdout)
    assert len(gen["token_ids"]) == 6 and gen["stats"]["bytes_to_device"] > 0
    for args, says in [(("--model", out, "--out", tmp_path / "x"), "quantized already"),
                       (("--model", d, "--out", out), "not an empty directory"),
                       (("--model", tmp_path / "none", "--out", tmp_path / "y"), "no config"),
                       (("--model", d, "--out", tmp_path / "z", "--block", "0,16"),
                        "must be positive")]:
        bad = cli("convert", *args, check=False)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr


def test_plan_replays_an_expert_trace_at_other_budgets(model_dir, tmp_path):
    """generate --trace-experts, then plan --trace: each policy's decode hit rate and bytes
    at the budget's slots and at 25 / 50 / 75% of the experts, beside the fewest possible
    (never more misses than a policy); another model's trace, or a file that is not a
    trace, is refused by name."""
    d, _ = model_dir
    trace = tmp_path / "trace.jsonl"
    cli("generate", "--model", d, "--prompt-ids", "3,14,15,92,65", "--max-new-tokens", 8,
        "--memory-budget", "600KiB", "--device", "cpu", "--prefetch", "none",
        "--trace-experts", trace)
    args = ("plan", "--model", d, "--memory-budget", "600KiB", "--device", "cpu")
    doc = json.loads(cli(*args, "--trace", trace, "--json").stdout)
    rows = doc["trace"]["rows"]
    assert doc["trace"]["decode_tokens"] == 7
    assert [r["slots"] for r in rows] == sorted({doc["expert_slots"], 6, 12, 18})
    for r in rows:
        floor = r["fewest"]["misses"]
        assert all(floor <= p["misses"] for p in r["policies"].values())
        assert set(r["policies"]) == {"lru", "lfu", "layer", "next-use"}
    assert rows[-1]["fewest"]["hit_rate"] >= rows[0]["fewest"]["hit_rate"]
    text = cli(*args, "--trace", trace).stdout
    assert "fewest possible" in text and "(this budget)" in text
    assert "moves the fewest bytes (--cache-policy " in text
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"moe_layers": [0], "num_experts": 3, "top_k": 1}) + "\n")
    bad = cli(*args, "--trace", other, check=False)
    assert bad.returncode == 2 and "another model" in bad.stderr
    (tmp_path / "junk").write_text("not json\n")
    bad = cli(*args, "--trace", tmp_path / "junk", check=False)
    assert bad.returncode == 2 and "not an expert trace" in bad.stderr


def _stream_events(url: str, body: dict, first: threading.Event, events: list) -> None:
    """POST body (streamed) and keep each server-sent event's data; set first at the first."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
                first.set()


def test_a_draining_server_finishes_what_is_in_flight_and_refuses_the_rest(model_dir,
                                                                          monkeypatch):
    """drain(): a stream still running (each step slowed to 20 ms) ends whole ([DONE],
    finish_reason length) before drain returns, and a request that comes while draining
    gets 503."""
    import time

    d, _ = model_dir
    session = Session(ServeConfig(model=str(d), memory_budget="600KiB", max_context=64,
                                  dtype="float32"))
    real = session.model.prefill
    monkeypatch.setattr(session.model, "prefill",
                        lambda *a, **kw: time.sleep(0.02) or real(*a, **kw))
    with serving(session) as srv:
        first, events = threading.Event(), []
        body = {"prompt": [3, 14, 15], "max_tokens": 50, "stream": True, "ignore_eos": True}
        t = threading.Thread(target=_stream_events,
                             args=(srv.url + "/v1/completions", body, first, events))
        t.start()
        assert first.wait(60)
        srv.shutdown()  # no new connections
        assert srv.in_flight == 1
        assert srv.drain(60) and srv.in_flight == 0  # the server wrote it all
        t.join(60)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    with serving(session) as srv:
        srv.draining = True
        code, _, text = _call(srv.url + "/v1/models")
        assert code == 503 and "shutting down" in text


def test_http_sigterm_lets_the_running_request_finish(model_dir):
    """moe-serve http on SIGTERM: the stream in flight ends whole, the process exits 0."""
    import re
    import signal

    d, _ = model_dir
    proc = subprocess.Popen([sys.executable, "-m", "serve", "http", "--model", str(d),
                             "--port", "0", "--device", "cpu", "--dtype", "float32",
                             "--memory-budget", "600KiB", "--max-context", "64",
                             "--max-batch", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"on (http://\S+) ", line)
            if m:
                url = m.group(1)
                break
        assert url is not None
        first, events = threading.Event(), []
        body = {"prompt": [3, 14, 15], "max_tokens": 50, "stream": True, "ignore_eos": True}
        t = threading.Thread(target=_stream_events,
                             args=(url + "/v1/completions", body, first, events))
        t.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        assert "SIGTERM: finishing" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _responses_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event of a Responses stream."""
    out, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


def test_http_responses_api_answers_as_chat_completions_do(server):
    """POST /v1/responses: instructions and input (a string, or message items with a
    developer role and input_text parts) answer as the chat request they mean; output an
    assistant message of output_text, usage in the Responses' names, "incomplete" when
    max_output_tokens cut it; streamed, the Responses events whose deltas make the text;
    what needs stored state or other tools is a 400."""
    url, _, _ = server
    chat = json.loads(request(url + "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "def add("}],
        "max_tokens": 6, "temperature": 0})[1])
    want, finish = chat["choices"][0]["message"]["content"], chat["choices"][0]["finish_reason"]
    base = {"instructions": "Be brief.", "input": "def add(", "max_output_tokens": 6,
            "temperature": 0}
    items = {"input": [{"role": "developer", "content": "Be brief."},
                       {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": "def add("}]}],
             "max_output_tokens": 6, "temperature": 0}
    for body in (base, items):
        code, text = request(url + "/v1/responses", body)
        r = json.loads(text)
        assert code == 200 and r["object"] == "response" and r["id"].startswith("resp_")
        assert [o["type"] for o in r["output"]] == ["message"]
        assert r["output"][0]["content"][0] == {"type": "output_text", "text": want,
                                                "annotations": []}
        assert r["status"] == ("incomplete" if finish == "length" else "completed")
        assert r["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
        assert r["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    code, text = request(url + "/v1/responses", dict(base, stream=True))
    events = _responses_events(text)
    names = [n for n, _ in events]
    assert code == 200 and names[0] == "response.created" and all(
        d["type"] == n and d["sequence_number"] == i for i, (n, d) in enumerate(events))
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    last = events[-1][1]
    assert deltas == want and last["type"] in ("response.completed", "response.incomplete")
    assert last["response"]["output"][0]["content"][0]["text"] == want
    assert last["response"]["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    for bad, fragment in (({"previous_response_id": "resp_1"}, "keeps no responses"),
                          ({"tools": [{"type": "web_search"}]}, "only function tools"),
                          ({"input": []}, "'input' must be"),
                          ({"text": {"format": {"type": "xml"}}}, "not supported")):
        code, text = request(url + "/v1/responses", dict(base, **bad))
        assert code == 400 and fragment in json.loads(text)["error"]["message"], text


def test_a_training_run_is_told_how_to_become_servable(tmp_path):
    """Our training runs and checkpoints hold no config.json: the error says to export."""
    from serve.store import ModelDirError, WeightStore

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (run / "checkpoints" / "step_00000004" / "model_config.json").write_text("{}")
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_00000004"):
        with pytest.raises(ModelDirError, match="training run or checkpoint") as e:
            WeightStore(path)
        assert f"python -m train.export {path} OUT" in str(e.value)
    with pytest.raises(ModelDirError, match=r"no config\.json"):
        WeightStore(tmp_path)
