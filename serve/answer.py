"""The parts of a chat answer, token by token: text, reasoning, tool calls and the format's own
framing, for the formats reasoning models answer in.

- harmony (GPT-OSS): <|start|>role<|channel|>name<|message|>text<|end|>. The analysis channel
  is reasoning; a message to a recipient `functions.NAME` (in either header, as
  "to=functions.NAME") is a call of tool NAME, its text the arguments.
- <think>...</think> (Qwen3, DeepSeek-R1): what the tags enclose is reasoning; a prompt whose
  last tag is <think> (a template that opens the thought itself) starts the answer inside it.
  <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen3, Hermes) is a tool call;
  one whose JSON does not read stays text.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from serve.text import TextCodec

Routed = list[tuple[str, int]]  # ("text" | "reasoning", token id) for each token to show


class AnswerParts:
    """Routes an answer's tokens: route(tok) -> the (part, id) pairs to show (none for
    framing, headers and tool calls); tool calls collect in `tool_calls` as {"name",
    "arguments" (a JSON string)}, each also given to on_tool_call when complete."""

    def __init__(self, codec: TextCodec, prompt: list[int] | None = None,
                 on_tool_call: Callable[[dict], None] | None = None):
        self.codec = codec
        self.harmony, self.think, self.tool_tags = codec.harmony, codec.think, codec.tool_tags
        self.tool_calls: list[dict] = []
        self.on_tool_call = on_tool_call
        self._part = "text"
        self._where = "text"  # harmony: "text" (a message), "role" or "channel" (headers)
        self._channel: str | None = None  # harmony: the open message's channel
        self._role: list[int] = []
        self._chan: list[int] = []
        self._call: tuple[str, list[int]] | None = None  # (tool name, argument ids)
        self._tag_call: list[int] | None = None  # <tool_call> ... ids so far
        if self.think is not None:
            tags = [t for t in prompt or () if t in self.think]
            if tags and tags[-1] == self.think[0]:
                self._part = "reasoning"

    @property
    def in_answer(self) -> bool:
        """Whether the next token is the answer's text: in harmony, of a final-channel
        message; with <think> tags, outside the thought (and any tool call)."""
        if self._call is not None or self._tag_call is not None or self._part != "text":
            return False
        return self.harmony is None or self._channel == "final"

    @staticmethod
    def knows(codec: TextCodec | None) -> bool:
        return codec is not None and any(
            x is not None for x in (codec.harmony, codec.think, codec.tool_tags))

    def route(self, tok: int) -> Routed:
        if self.harmony is not None and self._harmony(tok):
            return []
        if self._call is not None:
            self._call[1].append(tok)
            return []
        if self.think is not None and tok in self.think:
            self._part = "reasoning" if tok == self.think[0] else "text"
            return []
        if self.tool_tags is not None:
            return self._tagged(tok)
        return [(self._part, tok)]

    def finish(self) -> Routed:
        """The answer has ended (a harmony tool call ends it, at <|call|>) -> the tokens of an
        unclosed <tool_call>, to show as text."""
        self._end_call()
        ids, self._tag_call = self._tag_call or [], None
        return [(self._part, t) for t in ids]

    # -- harmony ----------------------------------------------------------------------------
    def _harmony(self, tok: int) -> bool:
        """Take a framing or header token -> True, or a message token -> False."""
        h = self.harmony
        if tok == h.start:
            self._end_call()
            self._where, self._role, self._chan, self._channel = "role", [], [], None
        elif tok == h.channel:
            self._where = "channel"
        elif tok == h.message:
            words = self.codec.decode(self._role + self._chan).split()
            chan = self.codec.decode(self._chan).split()
            to = next((w[3:] for w in words if w.startswith("to=")), "")
            if to.startswith("functions."):
                self._call = (to[len("functions."):], [])
            self._part = "reasoning" if chan[:1] == ["analysis"] else "text"
            self._where, self._channel = "text", (chan[:1] or [""])[0]
        elif tok == h.end:
            self._end_call()
            self._where, self._part, self._channel = "text", "text", None
        elif self._where == "channel":
            self._chan.append(tok)
        elif self._where == "role":
            self._role.append(tok)
        else:
            return False
        return True

    def _end_call(self) -> None:
        if self._call is not None:
            name, ids = self._call
            self._call = None
            self._add_call(name, self.codec.decode(ids).strip())

    # -- <tool_call> tags -------------------------------------------------------------------
    def _tagged(self, tok: int) -> Routed:
        open_, close = self.tool_tags
        if tok == open_ and self._tag_call is None:
            self._tag_call = [tok]
            return []
        if self._tag_call is None:
            return [(self._part, tok)]
        self._tag_call.append(tok)
        if tok != close:
            return []
        ids, self._tag_call = self._tag_call, None
        try:
            call = json.loads(self.codec.decode(ids[1:-1]))
            name, args = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError(name)
        except (ValueError, KeyError, TypeError):
            return [(self._part, t) for t in ids]  # not a call after all: it is text
        self._add_call(name, args if isinstance(args, str) else json.dumps(args))
        return []

    def _add_call(self, name: str, arguments: str) -> None:
        call = {"name": name, "arguments": arguments}
        self.tool_calls.append(call)
        if self.on_tool_call is not None:
            self.on_tool_call(call)
