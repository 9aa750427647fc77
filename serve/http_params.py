"""What an OpenAI completions or chat request asks, read from its JSON body: typed fields
(a wrong type or value is a `BadRequest`, answered with HTTP 400 naming the field), the
sampling settings, stop strings, n, best_of, echo, streaming, tools and the calls a
tool_choice forces."""

from __future__ import annotations

import json
from dataclasses import dataclass

from serve.sampling import MAX_LOGPROBS, SamplingConfig

MAX_N = 16  # most choices one request may ask for


class BadRequest(ValueError):
    """Answered with HTTP 400 and an OpenAI-style error object."""


def field(body: dict, name: str, kind, default, check=None):
    v = body.get(name, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be of type {kind.__name__}")
    if check is not None and not check(v):
        raise BadRequest(f"'{name}' has an invalid value {v!r}")
    return v



@dataclass
class Params:
    """What a request asks besides its prompts: max_tokens (0: echo only; None: up to the
    context), the sampling, stop strings, stream, n choices per prompt, echo, best_of
    candidates per prompt (>= n), include_usage (a stream's last chunk carries the usage),
    the tool call a chat's tool_choice forces (http_params.tools) and the predicted
    answer's text."""

    max_tokens: int | None  # None: up to the context
    sampling: SamplingConfig
    stop: list[str]
    stream: bool
    n: int
    echo: bool
    best_of: int
    include_usage: bool
    forced_call: str | None = None  # a chat's tool_choice: "required" or a tool's name
    prediction: str | None = None  # the predicted answer's text (OpenAI's "prediction")


def params(body: dict, chat: bool) -> Params:
    """The Params of a completions (chat=False) or chat request body."""
    # OpenAI's defaults: 16 new tokens for completions, up to the context for a chat (None)
    max_tokens = field(body, "max_tokens", int, None if chat else 16, lambda v: v >= 0)
    max_tokens = field(body, "max_completion_tokens", int, max_tokens, lambda v: v >= 0)
    echo = field(body, "echo", bool, False)
    if echo and chat:
        raise BadRequest("'echo' is a completions field")
    if max_tokens == 0 and not echo:
        raise BadRequest("'max_tokens' must be >= 1 (0 only with \"echo\": true)")
    sampling = SamplingConfig(
        temperature=field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2),
        top_p=field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1),
        top_k=field(body, "top_k", int, 0, lambda v: v >= 0),
        seed=field(body, "seed", int, None), logprobs=_logprobs(body, chat),
        repetition_penalty=field(body, "repetition_penalty", float, 1.0, lambda v: v > 0),
        presence_penalty=field(body, "presence_penalty", float, 0.0, lambda v: -2 <= v <= 2),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0,
                                 lambda v: -2 <= v <= 2),
        logit_bias=_logit_bias(body), ignore_eos=field(body, "ignore_eos", bool, False),
        min_tokens=field(body, "min_tokens", int, 0,
                         lambda v: 0 <= v and (max_tokens is None or v <= max(max_tokens, 1))))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str)
                                                                 for s in stop)):
        raise BadRequest("'stop' must be a string or a list of strings")
    n = field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N)
    stream = field(body, "stream", bool, False)
    best_of = field(body, "best_of", int, n, lambda v: n <= v <= MAX_N)
    if best_of > n and (chat or stream):
        raise BadRequest("'best_of' > n is a completions field and cannot stream")
    sampling.prompt_logprobs = echo and sampling.logprobs is not None
    # stream_options.include_usage: a last chunk with the usage and no choices
    usage = field(field(body, "stream_options", dict, {}), "include_usage", bool, False)
    return Params(max_tokens, sampling, stop or [], stream, n, echo, best_of, usage,
                  prediction=_prediction(body))


def _prediction(body: dict) -> str | None:
    """OpenAI's "prediction": {"type": "content", "content": text or [text parts]} -> the
    text."""
    pred = body.get("prediction")
    if pred is None:
        return None
    content = pred.get("content") if isinstance(pred, dict) and pred.get(
        "type") == "content" else None
    if isinstance(content, list) and all(isinstance(c, dict) and isinstance(
            c.get("text"), str) for c in content):
        content = "".join(c["text"] for c in content)
    if not isinstance(content, str):
        raise BadRequest("'prediction' must be {\"type\": \"content\", \"content\": a string "
                         "or a list of text parts}")
    return content


def tools(body: dict) -> tuple[list[dict] | None, str | None]:
    """The request's function tools for the chat template (None with tool_choice "none"),
    and the call tool_choice forces: "required" (one call or more, of any tool), a tool's
    name ({"type": "function", "function": {"name": ...}}), or None ("auto", "none")."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise BadRequest("'tools' must be a list of {\"type\": \"function\", \"function\": "
                         "{\"name\": ..., ...}}")
    if choice in ("auto", "none"):
        return (tools if choice == "auto" else None), None
    names = [t["function"]["name"] for t in tools or []]
    if choice == "required":
        forced = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("function"), dict) and isinstance(choice["function"].get("name"), str):
        forced = choice["function"]["name"]
        if forced not in names:
            raise BadRequest(f"'tool_choice' names {forced!r}, which is not among the 'tools' "
                             f"({', '.join(names) or 'none given'})")
    else:
        raise BadRequest(f"'tool_choice' must be \"auto\", \"none\", \"required\" or "
                         f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                         f"{choice!r}")
    if not names:
        raise BadRequest("'tool_choice' forces a call, but no 'tools' were given")
    return tools, forced


def call_format(tools: list[dict], forced: str) -> dict:
    """The response_format an answer forced to call tools follows (as vLLM asks): the named
    tool's arguments (its "parameters" schema), or for "required" a non-empty JSON list of
    {"name": a tool's, "parameters": its arguments}."""
    def params_of(t: dict) -> dict:
        schema = t["function"].get("parameters")
        return schema if isinstance(schema, dict) and schema else {"type": "object"}

    if forced != "required":
        schema = params_of(next(t for t in tools if t["function"]["name"] == forced))
    else:
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "additionalProperties": False,
             "required": ["name", "parameters"],
             "properties": {"name": {"const": t["function"]["name"]},
                            "parameters": params_of(t)}} for t in tools]}}
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


def forced_calls(forced: str, text: str) -> list[dict] | None:
    """A forced answer's text (call_format's JSON) -> its tool calls, {"name", "arguments"
    (JSON text)} each; None when it does not read (an answer cut by max_tokens)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if forced != "required":
        return [{"name": forced, "arguments": json.dumps(doc)}]
    return [{"name": c["name"], "arguments": json.dumps(c["parameters"])} for c in doc]


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants logprobs of (None: no logprobs).
    Chat: "logprobs": true with "top_logprobs": N; completions: "logprobs": N."""
    if chat:
        if not field(body, "logprobs", bool, False):
            if body.get("top_logprobs") not in (None, 0):
                raise BadRequest("'top_logprobs' needs \"logprobs\": true")
            return None
        return field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS)
    v = body.get("logprobs")
    if v is None or v is False:
        return None
    return field(body, "logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS)


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's "logit_bias": {"token id": bias in [-100, 100]} -> {id: bias}."""
    bias = field(body, "logit_bias", dict, {})
    out = {}
    for k, v in bias.items():
        if not (isinstance(k, str) and k.strip().isdigit()):
            raise BadRequest(f"'logit_bias' keys must be token ids, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise BadRequest(f"'logit_bias' of token {k} must be a number in [-100, 100], "
                             f"got {v!r}")
        out[int(k)] = float(v)
    return out or None
