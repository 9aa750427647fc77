"""OpenAI's Responses API (POST /v1/responses) over chat completions, stateless: a request
becomes the chat request it means (instructions -> a system message, input -> messages,
function_call / function_call_output items -> tool calls and their results,
max_output_tokens -> max_tokens, text.format -> response_format, reasoning.effort ->
reasoning_effort, function tools -> chat tools), and the chat answer becomes a Response
(output: a reasoning item when the model reasons, function_call items, an assistant message
of output_text; status "incomplete" when max_output_tokens cut it). Streamed, the chat
chunks become the Responses events (response.created, output items and their deltas,
response.completed or response.incomplete). What needs stored state (previous_response_id,
conversation, background) and tools other than functions are refused by name.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from serve.http_params import BadRequest

STATELESS = ("previous_response_id", "conversation", "background")
COPIED = ("temperature", "top_p", "top_k", "seed", "stream", "parallel_tool_calls", "stop",
          "presence_penalty", "frequency_penalty", "logit_bias", "prediction")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in (
            "input_text", "output_text", "text") and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"{where}: content must be a string or a list of input_text parts "
                     "(images and files are not supported)")


def _messages(items: list) -> list[dict]:
    """Input items -> chat messages (consecutive function calls: one assistant message)."""
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise BadRequest(f"{where}: role must be user, system, developer or "
                                 f"assistant, got {role!r}")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or _new_id("call"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not isinstance(call["function"]["name"], str) or not isinstance(
                    call["function"]["arguments"], str):
                raise BadRequest(f"{where}: a function_call needs a name and its arguments "
                                 "(a JSON string)")
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") \
                    and not out[-1].get("content"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # a model's earlier reasoning is not read back
        else:
            raise BadRequest(f"{where}: items of type {kind!r} are not supported (message, "
                             "function_call, function_call_output)")
    return out


def _tools(body: dict) -> dict:
    """The chat request's tools and tool_choice from the Responses' flat function tools."""
    tools = body.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRequest("'tools' must be a list of tools")
    chat_tools = []
    for t in tools:
        if t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise BadRequest(f"only function tools are supported, got {t.get('type')!r}")
        chat_tools.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}})
    out: dict = {"tools": chat_tools}
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        out["tool_choice"] = choice
    return out


def _format(body: dict) -> dict:
    """response_format from text.format (json_schema, json_object; text: none)."""
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is None or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"response_format": {"type": "json_object"}}
    if fmt.get("type") == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}}
    raise BadRequest(f"text.format type {fmt.get('type')!r} is not supported (text, "
                     "json_object, json_schema)")


def chat_body(body: dict) -> dict:
    """A Responses request -> the chat completions request it means; BadRequest names what
    it cannot map."""
    for key in STATELESS:
        if body.get(key):
            raise BadRequest(f"'{key}' is not supported: moe-serve keeps no responses; send "
                             "the whole conversation as 'input'")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string")
        messages.append({"role": "system", "content": instructions})
    inp = body.get("input")
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        messages += _messages(inp)
    else:
        raise BadRequest("'input' must be a string or a non-empty list of items")
    chat = {"messages": messages, **{k: body[k] for k in COPIED if k in body}}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(
        body.get("reasoning"), dict) else None
    if effort is not None:
        chat["reasoning_effort"] = effort
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return {**chat, **_tools(body), **_format(body)}


def _usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _reasoning_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or _new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id or _new_id("msg"), "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call: dict, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or _new_id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": "completed"}


def _response(body: dict, rid: str, created: int, model: str, output: list[dict],
              finish: str | None, usage: dict | None, status: str | None = None) -> dict:
    """A Response document (status from the finish reason unless given)."""
    cut = finish == "length"
    return {"id": rid, "object": "response", "created_at": created,
            "status": status or ("incomplete" if cut else "completed"), "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "text": body.get("text") or {"format": {"type": "text"}},
            "usage": _usage(usage)}


def response_doc(body: dict, chat: dict) -> dict:
    """The chat answer (one choice) as the Response of the Responses request body."""
    choice = chat["choices"][0]
    msg = choice["message"]
    output = []
    if msg.get("reasoning_content"):
        output.append(_reasoning_item(msg["reasoning_content"]))
    output += [_call_item(c) for c in msg.get("tool_calls") or []]
    if msg.get("content") or not output:
        output.append(_message_item(msg.get("content") or ""))
    return _response(body, _new_id("resp"), chat["created"], chat["model"], output,
                     choice.get("finish_reason"), chat.get("usage"))


class ResponseEvents:
    """Chat completion chunks in, Responses events out through send(type, doc): call it
    with each chunk (a dict) and "[DONE]" at the end."""

    def __init__(self, body: dict, send: Callable[[str, dict], None]):
        self.body, self.send = body, send
        self.rid, self.seq = _new_id("resp"), 0
        self.created, self.model = 0, ""
        self.items: list[dict] = []  # output so far
        self.open: dict | None = None  # the reasoning or message item receiving deltas
        self.finish, self.usage = None, None

    def _emit(self, kind: str, **doc) -> None:
        self.send(kind, {"type": kind, "sequence_number": self.seq, **doc})
        self.seq += 1

    def __call__(self, chunk: dict | str) -> None:
        if chunk == "[DONE]":
            self._close()
            done = _response(self.body, self.rid, self.created, self.model, self.items,
                             self.finish, self.usage)
            self._emit("response.completed" if done["status"] == "completed"
                       else "response.incomplete", response=done)
            return
        if self.seq == 0:
            self.created, self.model = chunk.get("created", 0), chunk.get("model", "")
            self._emit("response.created", response=_response(
                self.body, self.rid, self.created, self.model, [], None, None, "in_progress"))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                self._delta("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                self._delta("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                self._call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def _delta(self, kind: str, text: str) -> None:
        """text for the open item of kind, opening one (closing another) first."""
        if self.open is None or self.open["type"] != kind:
            self._close()
            item = _reasoning_item("") if kind == "reasoning" else _message_item(
                "", status="in_progress")
            self.open = item
            self.items.append(item)
            self._emit("response.output_item.added", output_index=len(self.items) - 1,
                       item=item)
            if kind == "message":
                self._emit("response.content_part.added", item_id=item["id"],
                           output_index=len(self.items) - 1, content_index=0,
                           part=item["content"][0])
        item = self.open
        item["content"][0]["text"] += text
        self._emit("response.reasoning_text.delta" if kind == "reasoning"
                   else "response.output_text.delta", item_id=item["id"],
                   output_index=len(self.items) - 1, content_index=0, delta=text)

    def _close(self) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        at, text = self.items.index(item), item["content"][0]["text"]
        if item["type"] == "reasoning":
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=at,
                       content_index=0, text=text)
        else:
            item["status"] = "completed"
            self._emit("response.output_text.done", item_id=item["id"], output_index=at,
                       content_index=0, text=text)
            self._emit("response.content_part.done", item_id=item["id"], output_index=at,
                       content_index=0, part=item["content"][0])
        self._emit("response.output_item.done", output_index=at, item=item)

    def _call(self, call: dict) -> None:
        """A tool call (whole, as chat streams send them) as a function_call item."""
        self._close()
        item = _call_item({"id": call.get("id") or _new_id("call"),
                           "function": call.get("function") or {}})
        self.items.append(item)
        at = len(self.items) - 1
        self._emit("response.output_item.added", output_index=at,
                   item={**item, "arguments": "", "status": "in_progress"})
        self._emit("response.function_call_arguments.delta", item_id=item["id"],
                   output_index=at, delta=item["arguments"])
        self._emit("response.function_call_arguments.done", item_id=item["id"],
                   output_index=at, arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=at, item=item)
