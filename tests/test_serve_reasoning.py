"""Chat answers of reasoning models: in the harmony format (GPT-OSS: <|start|>role<|channel|>
name<|message|>text<|end|>, the analysis channel is the reasoning, a message to
functions.NAME a tool call) or with <think>...</think> and <tool_call>...</tool_call> (Qwen3,
DeepSeek-R1). TextRow (serve/answer.py), the HTTP server ("reasoning_content", "tool_calls")
and `moe-serve chat` keep reasoning and calls apart from the text; chat template kwargs (e.g.
reasoning_effort) and tools reach the template.

The served models here are scripted: identity embeddings, attention and experts that add
nothing, and an lm_head whose row j points at j's predecessor, so greedy decoding walks a
fixed chain of tokens whatever came before."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.session import Session, TextRow  # noqa: E402
from serve.text import TextCodec  # noqa: E402
from tests.forked import run_module  # noqa: E402
from tests.hf_models import build_hf  # noqa: E402
from tests.http_helpers import request, serving  # noqa: E402

WORDS = ["[UNK]", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>",
         "assistant", "analysis", "final", "think", "hard", "so", "yes", "hi", "x",
         "commentary"]
SPECIAL = WORDS[1:6]
ID = {w: i for i, w in enumerate(WORDS)}
# what the scripted model says after a prompt ending in "<|start|>assistant"
CHAIN = ["assistant", "<|channel|>", "analysis", "<|message|>", "think", "hard", "<|end|>",
         "so", "yes", "<|return|>"]
TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
            "{% if reasoning_effort == 'high' %}x x x {% endif %}<|start|>assistant")
# <think> tags (not special tokens, as in Qwen3); the template opens the thought (as
# DeepSeek-R1's does), so the answer starts inside it
THINK_WORDS = ["[UNK]", "<eos>", "<think>", "</think>", "hmm", "ok", "so", "yes", "hi"]
THINK_CHAIN = ["<think>", "hmm", "ok", "</think>", "so", "yes", "<eos>"]
THINK_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}<think>"
# a harmony model that calls a tool; the template writes the tools' names and the city of an
# earlier call (its arguments parsed from OpenAI's JSON text)
CALL_WORDS = ["[UNK]", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>",
              "<|call|>", "assistant", "commentary", "to=functions.get", '{"city":"Paris"}',
              "hi", "get", "Paris", "<tool_call>", "</tool_call>"]
CALL_CHAIN = ["assistant", "<|channel|>", "commentary", "to=functions.get", "<|message|>",
              '{"city":"Paris"}', "<|call|>"]
CALL_TEMPLATE = ("{% for t in tools or [] %}{{ t.function.name }} {% endfor %}"
                 "{% for m in messages %}{% if m.tool_calls %}"
                 "{{ m.tool_calls[0].function.arguments.city }} "
                 "{% else %}{{ m.content }} {% endif %}{% endfor %}<|start|>assistant")


def save_scripted(d, words, chain, template, eos, special, normal=()) -> None:
    """A Mixtral-layout model and a word-level tokenizer (words split at spaces) in d: greedy
    decoding after any token of `chain` continues the chain. eos: a word or a list."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    idx = {w: i for i, w in enumerate(words)}
    V = -(-len(words) // 8) * 8  # 4 heads of an even width; ids past the words unused
    hf = build_hf("mixtral", vocab_size=V, hidden_size=V, tie_word_embeddings=False)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()  # each layer adds nothing: the last hidden state is the embedding
            elif "norm" in name:
                p.fill_(1.0)
        hf.model.embed_tokens.weight.copy_(torch.eye(V))
        hf.lm_head.weight.zero_()
        for prev, nxt in zip(chain[:-1], chain[1:], strict=True):
            hf.lm_head.weight[idx[nxt], idx[prev]] = 5.0
    hf.save_pretrained(d)
    eos = [eos] if isinstance(eos, str) else eos
    (d / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [idx[e] for e in eos]}))
    tok = Tokenizer(models.WordLevel(idx, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(w, special=True) for w in special])
    tok.add_tokens([AddedToken(w, special=False) for w in normal])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos[0],
        "chat_template": template}))


@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    """Greedy answer to any chat prompt: CHAIN[1:]."""
    d = tmp_path_factory.mktemp("harmony")
    save_scripted(d, WORDS, CHAIN, TEMPLATE, "<|return|>", SPECIAL)
    return d


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    """Greedy answer to any chat prompt: THINK_CHAIN[1:]."""
    d = tmp_path_factory.mktemp("think")
    save_scripted(d, THINK_WORDS, THINK_CHAIN, THINK_TEMPLATE, "<eos>", ["<eos>"],
                  ["<think>", "</think>"])
    return d


@pytest.fixture(scope="module")
def call_dir(tmp_path_factory):
    """Greedy answer to any chat prompt: CALL_CHAIN[1:], a call of tool "get"."""
    d = tmp_path_factory.mktemp("call")
    save_scripted(d, CALL_WORDS, CALL_CHAIN, CALL_TEMPLATE, ["<|return|>", "<|call|>"],
                  CALL_WORDS[1:7], ["<tool_call>", "</tool_call>"])
    return d


def ids(*words: str) -> list[int]:
    return [ID[w] for w in words]


def run_row(codec, tokens, stop=(), channels=True, prompt=None):
    text, reasoning = [], []
    row = TextRow(codec, codec.stop_ids, list(stop), text.append, channels=channels,
                  on_reasoning=reasoning.append, prompt=prompt)
    ended = []
    for t in tokens:  # as generation does: the row's first True ends it
        ended.append(row.on_token(t))
        if ended[-1]:
            break
    final = row.finish()
    return row, final, "".join(text), "".join(reasoning), ended


def test_a_harmony_answer_splits_into_its_reasoning_and_its_text(harmony_dir):
    codec = TextCodec(harmony_dir)
    assert codec.harmony is not None
    answer = ids("<|channel|>", "analysis", "<|message|>", "think", "hard", "<|end|>",
                 "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "so", "yes",
                 "<|return|>")
    row, text, streamed, reasoned, _ = run_row(codec, answer)
    assert (text, row.reasoning) == ("so yes", "think hard")
    assert (streamed, reasoned) == (text, row.reasoning)
    # without the split (raw completions) every word is text, headers included
    row, text, _, _, _ = run_row(codec, answer, channels=False)
    assert text == "analysis think hard assistant final so yes" and row.reasoning is None


def test_stop_strings_cut_the_text_not_the_reasoning(harmony_dir):
    codec = TextCodec(harmony_dir)
    answer = ids("<|channel|>", "analysis", "<|message|>", "yes", "think", "<|end|>",
                 "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "so", "yes",
                 "hard")
    row, text, streamed, _, ended = run_row(codec, answer, stop=["yes"])
    assert row.reasoning == "yes think"  # a stop string in the reasoning does not end the row
    assert text.strip() == "so" and streamed == text
    assert len(ended) == 13 and ended[-1]  # ended at the text's "yes"


def test_other_channels_and_unframed_tokens_are_text(harmony_dir):
    codec = TextCodec(harmony_dir)
    # a commentary header with a recipient; text before any framing; a role with no channel
    answer = ids("hi", "<|channel|>", "commentary", "x", "<|message|>", "so", "<|end|>",
                 "<|start|>", "assistant", "<|message|>", "yes")
    row, text, _, _, _ = run_row(codec, answer)
    assert (text, row.reasoning) == ("hi so yes", "")


def test_chat_template_kwargs_reach_the_template(harmony_dir):
    codec = TextCodec(harmony_dir)
    msgs = [{"role": "user", "content": "hi"}]
    assert codec.render_chat(msgs) == "hi <|start|>assistant"
    assert codec.render_chat(msgs, reasoning_effort="high") == "hi x x x <|start|>assistant"
    with pytest.raises(ValueError, match="eos_token, messages"):
        codec.render_chat(msgs, **{"eos_token": "?", "messages": []})
    codec.chat_template = "{{ raise_exception('only users speak here') }}"
    with pytest.raises(ValueError, match="only users speak here"):
        codec.render_chat(msgs)


def test_think_tags_enclose_the_reasoning(think_dir):
    codec = TextCodec(think_dir)
    assert codec.harmony is None and codec.think is not None
    w = {x: i for i, x in enumerate(THINK_WORDS)}
    said = [w[x] for x in ("hi", "<think>", "hmm", "ok", "</think>", "so", "yes")]
    row, text, streamed, reasoned, _ = run_row(codec, said)  # Qwen3 opens the thought itself
    assert (text, row.reasoning) == ("hi so yes", "hmm ok") and reasoned == row.reasoning
    # a prompt whose last tag opens a thought: the answer starts inside it
    opened = [w["hi"], w["<think>"]]
    row, text, _, _, _ = run_row(codec, said[2:], prompt=opened)
    assert (text, row.reasoning) == ("so yes", "hmm ok")
    closed = opened + [w["</think>"]]  # e.g. Qwen3 with enable_thinking false
    row, text, _, _, _ = run_row(codec, said[5:], prompt=closed)
    assert (text, row.reasoning) == ("so yes", "")
    row, text, _, _, _ = run_row(codec, said, channels=False)
    assert row.reasoning is None and "hmm ok" in text


def test_a_think_model_answers_http_chat_with_its_reasoning_apart(think_dir):
    """The prompt the template writes ends in <think>: the server starts the answer inside
    the thought."""
    session = Session(ServeConfig(model=str(think_dir), max_context=64, dtype="float32"))
    with serving(session) as srv:
        code, plain = request(srv.url + "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 20, "temperature": 0})
    assert code == 200, plain
    msg = json.loads(plain)["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == ("so yes", "hmm ok")


@pytest.fixture(scope="module")
def harmony_server(harmony_dir):
    session = Session(ServeConfig(model=str(harmony_dir), max_context=64, dtype="float32"))
    with serving(session) as srv:
        yield srv.url


def test_http_chat_answers_with_reasoning_content_apart(harmony_server):
    url = harmony_server + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "temperature": 0}
    code, plain = request(url, body)
    assert code == 200, plain
    doc = json.loads(plain)
    msg = doc["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == ("so yes", "think hard")
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["completion_tokens"] == len(CHAIN) - 1
    code, streamed = request(url, dict(body, stream=True))
    assert code == 200
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in streamed.splitlines()
              if line.startswith("data: {")]
    assert "".join(d.get("content", "") for d in deltas) == "so yes"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "think hard"
    # reasoning_effort and chat_template_kwargs reach the template (3 more prompt tokens)
    base = doc["usage"]["prompt_tokens"]
    for extra in ({"reasoning_effort": "high"},
                  {"chat_template_kwargs": {"reasoning_effort": "high"}}):
        code, plain = request(url, dict(body, **extra))
        assert code == 200 and json.loads(plain)["usage"]["prompt_tokens"] == base + 3
    for bad, fragment in (({"chat_template_kwargs": [1]}, "'chat_template_kwargs'"),
                          ({"chat_template_kwargs": {"messages": []}}, "may not set"),
                          ({"tools": [{"type": "function"}]}, "'tools' must be"),
                          ({"tools": [], "tool_choice": "required"}, "'tool_choice'")):
        code, plain = request(url, dict(body, **bad))
        assert code == 400 and fragment in json.loads(plain)["error"]["message"], plain
    # a grammar holds the final channel only: this answer has none, so it is the model's own
    code, plain = request(url, dict(body, response_format={"type": "json_object"}))
    assert code == 200 and json.loads(plain)["choices"][0]["message"] == msg


def test_cli_chat_prints_the_reasoning_only_when_asked(harmony_dir):
    def chat(*flags):
        return run_module("serve", ["chat", "--model", harmony_dir, "--quiet", "--dtype",
                                    "float32", "--max-new-tokens", "20", *flags],
                          input="hi\n\n")

    p = chat()
    assert p.returncode == 0, p.stderr
    assert "so yes" in p.stdout and "think" not in p.stdout + p.stderr
    p = chat("--show-reasoning", "--chat-template-kwargs", '{"reasoning_effort": "high"}')
    assert p.returncode == 0, p.stderr
    assert "so yes" in p.stdout and "think hard" in p.stderr and "think" not in p.stdout
    p = chat("--chat-template-kwargs", "[1]")
    assert p.returncode == 2 and "JSON object" in p.stderr


def test_tool_calls_in_either_format_are_kept_apart(call_dir):
    codec = TextCodec(call_dir)
    w = {x: i for i, x in enumerate(CALL_WORDS)}
    # harmony: the recipient in the role header, as GPT-OSS's template writes it, or in the
    # channel's; a message with no recipient is text
    said = [w[x] for x in ("<|channel|>", "commentary", "to=functions.get", "<|message|>",
                           '{"city":"Paris"}', "<|end|>", "<|start|>", "assistant",
                           "to=functions.get", "<|channel|>", "commentary", "<|message|>",
                           '{"city":"Paris"}', "<|end|>", "<|start|>", "assistant",
                           "<|message|>", "hi")]
    calls = []
    row = TextRow(codec, codec.stop_ids, [], channels=True, on_tool_call=calls.append)
    for t in said:
        row.on_token(t)
    assert row.finish() == "hi" and row.reasoning == ""
    assert calls == row.tool_calls == [{"name": "get", "arguments": '{"city":"Paris"}'}] * 2


def test_tool_call_tags_hold_a_call_or_stay_text(tmp_path):
    """<tool_call> JSON </tool_call> (Qwen3): a call; JSON that does not read, or a tag never
    closed, stays text (nothing is lost)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<tool_call>", "</tool_call>", "hi", "ok",
             '{"name":"get","arguments":{"city":"Paris"}}', "{broken"]
    tok = Tokenizer(models.WordLevel({x: i for i, x in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(x, special=False) for x in words[1:3]])
    tok.save(str(tmp_path / "tokenizer.json"))
    codec = TextCodec(tmp_path)
    assert codec.tool_tags == (1, 2) and codec.harmony is None and codec.think is None

    def run(*seq):
        row = TextRow(codec, set(), [], channels=True)
        for x in seq:
            row.on_token(words.index(x))
        return row.finish(), row.tool_calls

    assert run("hi", "<tool_call>", words[5], "</tool_call>", "ok") == (
        "hi ok", [{"name": "get", "arguments": '{"city": "Paris"}'}])
    assert run("hi", "<tool_call>", "{broken", "</tool_call>") == (
        "hi <tool_call> {broken </tool_call>", [])
    assert run("hi", "<tool_call>", words[5]) == (f"hi <tool_call> {words[5]}", [])


def test_http_chat_returns_a_tool_call_with_the_tools_in_the_prompt(call_dir):
    session = Session(ServeConfig(model=str(call_dir), max_context=64, dtype="float32"))
    tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
    earlier = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get", "arguments": '{"city": "Paris"}'}}]}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "temperature": 0, "tools": tools}
    with serving(session) as srv:
        url = srv.url + "/v1/chat/completions"
        code, plain = request(url, body)
        assert code == 200, plain
        doc = json.loads(plain)
        choice = doc["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"] == {"name": "get", "arguments": '{"city":"Paris"}'}
        # the tools' names and the earlier call's parsed arguments are in the prompt
        base = doc["usage"]["prompt_tokens"]
        code, plain = request(url, dict(body, tool_choice="none"))
        assert json.loads(plain)["usage"]["prompt_tokens"] == base - 1
        code, plain = request(url, dict(body, messages=body["messages"] + [earlier]))
        assert json.loads(plain)["usage"]["prompt_tokens"] == base + 1
        code, streamed = request(url, dict(body, stream=True))
        chunks = [json.loads(line[6:])["choices"][0] for line in streamed.splitlines()
                  if line.startswith("data: {")]
        deltas = [c["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["delta"]]
        assert [d[0]["function"] for d in deltas] == [call["function"]]
        assert deltas[0][0]["index"] == 0 and chunks[-1]["finish_reason"] == "tool_calls"


def test_messages_reach_the_template_as_transformers_hands_them(harmony_dir, tmp_path):
    """None values dropped (OpenAI's "content": null beside tool calls), an earlier answer's
    reasoning under "thinking" too (GPT-OSS's template reads that name)."""
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(harmony_dir / f, tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}:{{ 'content' in m }}:{{ m.thinking }}:"
        "{{ m.reasoning_content }};{% endfor %}")
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "so", "reasoning_content": "think"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
            {"role": "assistant", "content": "ok", "thinking": "hard"}]
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=False)
    assert TextCodec(tmp_path).render_chat(msgs, add_generation_prompt=False) == ref
    assert ref == ("user:True::;assistant:True:think:think;assistant:False::;"
                   "assistant:True:hard:hard;")


def test_cli_chat_names_a_tool_call_it_does_not_run(call_dir):
    p = run_module("serve", ["chat", "--model", call_dir, "--quiet", "--dtype", "float32",
                             "--max-new-tokens", "20"], input="hi\n\n")
    assert p.returncode == 0, p.stderr
    assert '[tool call get({"city":"Paris"}): not run here]' in p.stderr
    assert "Paris" not in p.stdout


def test_text_content_parts_read_as_one_string(harmony_dir):
    codec = TextCodec(harmony_dir)
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "x"}]
    assert codec.render_chat([{"role": "user", "content": parts}]) == \
        codec.render_chat([{"role": "user", "content": "hi\nx"}])
    with pytest.raises(ValueError, match="text only"):
        codec.render_chat([{"role": "user", "content": [{"type": "image_url"}]}])
    codec.chat_template = "{{ messages[0].content + 1 }}"  # a template that cannot read them
    with pytest.raises(ValueError, match="refused the messages"):
        codec.render_chat([{"role": "user", "content": "hi"}])
