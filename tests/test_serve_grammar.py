"""Structured output: answers held to a JSON schema or to a JSON object (xgrammar) parse and
validate, greedy and sampled, batched, streamed, over HTTP and from the CLI; bad formats are
refused by name."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

from serve.config import ServeConfig  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.session import Session  # noqa: E402
from tests.forked import run_module  # noqa: E402
from tests.hf_models import CODE_TEXTS, save_served_model, save_tokenizer, saved_hf  # noqa: E402
from tests.http_helpers import request, serving  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["lang", "ok", "n"],
          "properties": {"lang": {"enum": ["py", "c", "go"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


def valid(text: str) -> bool:
    doc = json.loads(text)
    return (set(doc) == {"lang", "ok", "n"} and doc["lang"] in ("py", "c", "go")
            and isinstance(doc["ok"], bool) and doc["n"] in range(10))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    d = tmp_path_factory.mktemp("grammar")
    save_served_model(d, seed=3)
    return Session(ServeConfig(model=str(d), max_context=96, max_batch=3, dtype="float32"))


def test_answers_follow_the_schema_greedy_and_sampled(session):
    ids = [session.codec.encode(p) for p in ("def f", "import os", "class A")]
    plain, _ = session.complete(ids, 40)
    assert not any(o.text.startswith("{") for o in plain)  # unconstrained: not JSON
    grammar = session.grammar(FORMAT)
    for cfg in (SamplingConfig(grammar=grammar),
                SamplingConfig(temperature=1.0, seed=4, grammar=grammar, frequency_penalty=0.5)):
        outs, _ = session.complete(ids, 40, cfg)
        for o in outs:
            assert o.finish_reason == "stop" and valid(o.text), o.text
            assert list(json.loads(o.text)) == ["lang", "ok", "n"]  # in the schema's order
            assert o.token_ids[-1] in session.stop_ids  # whole, then the stop token
    assert session.grammar(FORMAT).compiled is grammar.compiled  # compiled once


def test_json_object_is_one_compact_object(session):
    outs, _ = session.complete([session.codec.encode("def f")], 60,
                               SamplingConfig(grammar=session.grammar(
                                   {"type": "json_object"})))
    o = outs[0]
    assert o.text.startswith("{")
    if o.finish_reason == "stop":
        assert isinstance(json.loads(o.text), dict)
    assert session.grammar({"type": "text"}) is None


@pytest.mark.parametrize("fmt,fragment", [
    ({"type": "yaml"}, "type 'yaml' is not supported"),
    ({"type": "json_schema"}, "needs \"json_schema\""),
    ("json", "must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}},
     "cannot be compiled"),
])
def test_bad_formats_are_refused_by_name(session, fmt, fragment):
    with pytest.raises(ValueError, match=fragment):
        session.grammar(fmt)


def test_http_response_format_plain_and_streamed(session):
    with serving(session) as srv:
        base = srv.url + "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
                "temperature": 0, "response_format": FORMAT}
        code, plain = request(base, body)
        assert code == 200, plain
        choice = json.loads(plain)["choices"][0]
        assert choice["finish_reason"] == "stop" and valid(choice["message"]["content"])
        code, streamed = request(base, dict(body, stream=True))
        chunks = [json.loads(line[6:]) for line in streamed.splitlines()
                  if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == choice["message"]["content"]
        code, bad = request(base, dict(body, response_format={"type": "json_schema"}))
        assert code == 400 and "json_schema" in json.loads(bad)["error"]["message"]


def _tool(name: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "additionalProperties": False, "required": list(properties),
        "properties": properties}}}


TOOLS = [_tool("weather", {"city": {"enum": ["Paris", "Rome"]}}),
         _tool("add", {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                       "b": {"type": "integer", "minimum": 0, "maximum": 9}})]


def _valid_call(call: dict) -> bool:
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "weather":
        return args in ({"city": "Paris"}, {"city": "Rome"})
    return set(args) == {"a", "b"} and all(args[k] in range(10) for k in args)


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    """The session's model, with room for a list of calls (~60 tokens of characters)."""
    d = tmp_path_factory.mktemp("roomy")
    saved_hf("mixtral", d, seed=3, max_position_embeddings=256)
    save_tokenizer(d, CODE_TEXTS)
    return Session(ServeConfig(model=str(d), max_context=256, dtype="float32"))


def test_http_tool_choice_forces_a_call(roomy):
    """tool_choice "required" or a named function holds the answer to the calls' JSON (as
    vLLM does), answered as tool_calls, plain and streamed; an answer cut short stays text;
    bad choices are 400s."""
    session = roomy
    with serving(session) as srv:
        base = srv.url + "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                "temperature": 0, "tools": TOOLS}
        code, plain = request(base, body)  # auto: this model answers in text
        assert code == 200 and "tool_calls" not in json.loads(plain)["choices"][0]["message"]
        named = dict(body, tool_choice={"type": "function", "function": {"name": "add"}})
        # this random model would list calls without end: "]" wherever the grammar allows it
        end = {str(session.codec.tok.token_to_id("]")): 100}
        for choice in (named["tool_choice"], "required"):
            code, plain = request(base, dict(body, tool_choice=choice, logit_bias=end))
            assert code == 200, plain
            c = json.loads(plain)["choices"][0]
            assert c["finish_reason"] == "tool_calls", c
            assert c["message"]["content"] is None
            calls = c["message"]["tool_calls"]
            assert calls and all(_valid_call(x) for x in calls), calls
            if choice != "required":
                assert [x["function"]["name"] for x in calls] == ["add"]
        code, plain = request(base, named)
        want = json.loads(plain)["choices"][0]["message"]["tool_calls"][0]["function"]
        code, streamed = request(base, dict(named, stream=True))
        chunks = [json.loads(line[6:]) for line in streamed.splitlines()
                  if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        calls = [t for d in deltas for t in d.get("tool_calls", [])]
        assert [t["function"] for t in calls] == [want] and calls[0]["index"] == 0
        assert not any(d.get("content") for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        code, plain = request(base, dict(named, max_tokens=3))  # cut short: text
        c = json.loads(plain)["choices"][0]
        assert c["finish_reason"] == "length" and c["message"]["content"].startswith("{")
        assert "tool_calls" not in c["message"]
        for bad, fragment in (
                ({"tool_choice": {"type": "function", "function": {"name": "x"}}},
                 "not among"),
                ({"tools": None, "tool_choice": "required"}, "no 'tools'"),
                ({"tool_choice": "always"}, "'tool_choice' must be"),
                ({"tool_choice": "required", "response_format": FORMAT}, "give one")):
            code, plain = request(base, dict(body, **bad))
            assert code == 400 and fragment in json.loads(plain)["error"]["message"], plain


def test_cli_response_format_takes_a_schema_file(session, tmp_path):
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA))
    d = session.model.scfg.model
    p = run_module("serve", ["generate", "--model", d, "--quiet", "--dtype", "float32",
                             "--prompt", "def f", "--max-new-tokens", "40",
                             "--response-format", schema, "--json"])
    assert p.returncode == 0, p.stderr
    assert valid(json.loads(p.stdout)["text"])
    p = run_module("serve", ["chat", "--model", d, "--quiet", "--dtype", "float32",
                             "--max-new-tokens", "40", "--response-format", schema],
                   input="hi\n\n")
    assert p.returncode == 0, p.stderr
    assert valid(p.stdout.split("> ")[1].strip())  # the answer to the one turn
    p = run_module("serve", ["generate", "--model", d, "--quiet", "--prompt", "x",
                             "--response-format", "xml"])
    assert p.returncode == 2 and "neither 'json' nor a JSON-schema file" in p.stderr


def test_without_xgrammar_a_format_is_refused_by_name(session, monkeypatch):
    from serve.grammar import Grammars

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    grammars = Grammars(session.codec.tok, session.model.cfg.vocab_size, session.stop_ids)
    with pytest.raises(ValueError, match=r"needs xgrammar: pip install 'moe-framework\[struc"):
        grammars.compile({"type": "json_object"})
    assert grammars.compile({"type": "text"}) is None  # plain text needs nothing


# -- reasoning models: the grammar holds the answer, not the reasoning ----------------------
# the scripted models of test_serve_reasoning (greedy decoding walks a fixed chain of words),
# with "{}" (an empty JSON object, the only JSON their words can spell) in their vocabulary


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """(harmony session, <think> session) of scripted models that know "{}"."""
    from tests import test_serve_reasoning as r

    h, t = tmp_path_factory.mktemp("harmony_g"), tmp_path_factory.mktemp("think_g")
    r.save_scripted(h, r.WORDS + ["{}"], r.CHAIN, r.TEMPLATE, "<|return|>", r.SPECIAL)
    r.save_scripted(t, r.THINK_WORDS + ["{}"], r.THINK_CHAIN, r.THINK_TEMPLATE, "<eos>",
                    ["<eos>"], ["<think>", "</think>"])
    return tuple(Session(ServeConfig(model=str(d), max_context=48, dtype="float32"))
                 for d in (h, t))


def words(session, ids: list[int]) -> list[str]:
    return [session.codec.tok.id_to_token(i) for i in ids]


def answer(session, prompt: str, **sampling):
    cfg = SamplingConfig(grammar=session.grammar({"type": "json_object"}), **sampling)
    ids = session.codec.tok.encode(prompt).ids
    return session.complete([ids], 12, cfg, channels=True)[0][0]


def test_harmony_reasoning_is_free_and_the_final_message_is_held(scripted):
    """GPT-OSS: the analysis channel and what lies outside a message are not held (the
    answer is the model's own); a final-channel message is: "{}", then the stop token."""
    harmony, _ = scripted
    free = answer(harmony, "hi <|start|> assistant")
    plain = harmony.complete([harmony.codec.tok.encode("hi <|start|> assistant").ids], 12,
                             channels=True)[0][0]
    assert free.token_ids == plain.token_ids  # analysis, then words after <|end|>
    assert words(harmony, free.token_ids)[:4] == ["<|channel|>", "analysis", "<|message|>",
                                                  "think"]
    held = answer(harmony, "hi <|start|> assistant <|channel|> final <|message|>")
    assert words(harmony, held.token_ids) == ["{}", "<|return|>"]
    assert held.text == "{}" and held.finish_reason == "stop"


def test_a_think_model_thinks_then_answers_in_json(scripted):
    """<think> tags: a thought the template opened runs free to </think>, then the answer is
    held; with no thought open, the first token may open one (then the same) or start the
    JSON at once."""
    _, think = scripted
    opened = answer(think, "hi <think>")  # the template's thought: "hmm ok </think>", then "{}"
    assert words(think, opened.token_ids) == ["hmm", "ok", "</think>", "{}", "<eos>"]
    assert opened.reasoning.split() == ["hmm", "ok"] and opened.text == "{}"
    # no thought open: greedy picks <think> (all logits 0 after "x": the lowest allowed id)
    thought = answer(think, "hi x")
    assert words(think, thought.token_ids) == ["<think>", "hmm", "ok", "</think>", "{}",
                                               "<eos>"]
    brace = think.codec.tok.token_to_id("{}")
    direct = answer(think, "hi x", logit_bias={brace: 5.0})
    assert words(think, direct.token_ids) == ["{}", "<eos>"] and direct.reasoning == ""


def test_http_chat_gives_the_reasoning_apart_and_the_json_as_content(scripted):
    """Over HTTP a <think> model's held answer is its content, its thought reasoning_content,
    plain and streamed."""
    _, think = scripted
    with serving(think) as srv:
        base = srv.url + "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                "temperature": 0, "response_format": {"type": "json_object"}}
        code, plain = request(base, body)
        assert code == 200, plain
        message = json.loads(plain)["choices"][0]["message"]
        assert message["content"] == "{}" and message["reasoning_content"].split() == [
            "hmm", "ok"]
        code, streamed = request(base, dict(body, stream=True))
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in streamed.splitlines()
                  if line.startswith("data: {")]
        assert "".join(d.get("content") or "" for d in deltas) == "{}"
        assert "".join(d.get("reasoning_content") or "" for d in deltas).split() == [
            "hmm", "ok"]


def test_speculating_rows_follow_the_grammar_as_a_token_a_step(session, scripted):
    """Drafts are judged under the grammar at each position (its state advanced by each
    token taken): a schema's answers, and a <think> model's thought then JSON, are the
    tokens of a token a step."""
    fast = Session(ServeConfig(model=session.model.scfg.model, max_context=96, max_batch=3,
                               dtype="float32", speculate=4))
    ids = [session.codec.encode(p) for p in ("def f", "import os", "class A")]
    plain, quick = ([o.token_ids for o in s.complete(
        ids, 40, SamplingConfig(grammar=s.grammar(FORMAT)))[0]] for s in (session, fast))
    assert quick == plain
    _, think = scripted
    quick = Session(ServeConfig(model=think.model.scfg.model, max_context=48,
                                dtype="float32", speculate=4))
    for prompt in ("hi <think>", "hi x"):
        a, b = (answer(s, prompt) for s in (think, quick))
        assert (a.token_ids, a.text, a.reasoning) == (b.token_ids, b.text, b.reasoning)


def test_http_responses_api_forced_function_calls_and_their_results(roomy):
    """/v1/responses with flat function tools and a named tool_choice answers with a
    function_call item (plain and streamed); the call and its function_call_output fed back
    as input items read as the assistant's tool call and the tool's result."""
    session = roomy
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    end = {str(session.codec.tok.token_to_id("]")): 100}
    body = {"input": "hi", "max_output_tokens": 100, "temperature": 0, "tools": flat,
            "tool_choice": {"type": "function", "name": "add"}, "logit_bias": end}
    with serving(session) as srv:
        code, text = request(srv.url + "/v1/responses", body)
        assert code == 200, text
        calls = [o for o in json.loads(text)["output"] if o["type"] == "function_call"]
        assert calls and calls[0]["name"] == "add" and calls[0]["call_id"]
        assert _valid_call({"function": {"name": "add", "arguments": calls[0]["arguments"]}})
        code, streamed = request(srv.url + "/v1/responses", dict(body, stream=True))
        done = [json.loads(line[6:]) for line in streamed.splitlines()
                if line.startswith("data: ")]
        args = [d["arguments"] for d in done
                if d["type"] == "response.function_call_arguments.done"]
        assert args == [calls[0]["arguments"]]
        turn = [{"role": "user", "content": "hi"},
                {"type": "function_call", "call_id": calls[0]["call_id"], "name": "add",
                 "arguments": calls[0]["arguments"]},
                {"type": "function_call_output", "call_id": calls[0]["call_id"],
                 "output": "7"}]
        read = []
        for items in (turn[:2], turn):  # the result adds the tool's message to the prompt
            code, text = request(srv.url + "/v1/responses", {
                "input": items, "max_output_tokens": 4, "temperature": 0, "tools": flat})
            r = json.loads(text)
            assert code == 200 and r["output"][-1]["type"] == "message", text
            read.append(r["usage"]["input_tokens"])
        assert read[1] > read[0]
