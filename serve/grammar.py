"""Structured output: an answer held to JSON (any JSON object, or one JSON schema), OpenAI's
"response_format", with xgrammar (the grammar engine of vLLM and SGLang): before each token
is drawn, the tokens the grammar cannot take next are masked out, and once the JSON is whole
only a stop token may follow. json_object asks for one JSON object; json_schema for a value
of the schema. The JSON is compact (no whitespace but one space after ':' and ','), so a
model cannot pad it without end.

`Grammars` compiles response formats for one tokenizer (cached); an `AnswerGrammar` (the
compiled grammar, and for a reasoning model its codec) rides in SamplingConfig.grammar, and
each row of a DecodeBatch follows it with its own `Constraint`. A reasoning model's grammar
holds its answer only, not its reasoning (as vLLM's reasoning parsers do): GPT-OSS thinks
freely in harmony's analysis channel and the grammar holds the final channel's message; a
<think> model (Qwen3, DeepSeek-R1) may open a thought at its first token, and the grammar
holds what follows </think> (or, with no thought, the answer from its first token).
xgrammar is optional (`pip install 'moe-framework[structured]'`); a format asked without it is
refused by name.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

INSTALL = "pip install 'moe-framework[structured]' (xgrammar)"


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(f"structured output (response_format) needs xgrammar: {INSTALL}") \
            from e
    return xgrammar


def format_key(fmt: dict) -> str | None:
    """OpenAI's response_format -> a canonical key: None for {"type": "text"} (no constraint),
    "json" for {"type": "json_object"}, the schema's JSON text for {"type": "json_schema",
    "json_schema": {"schema": {...}, ...}}; ValueError names what is wrong."""
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ValueError("'response_format' must be an object with a \"type\"")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("'response_format' of type json_schema needs \"json_schema\": "
                             "{\"name\": ..., \"schema\": {...}}")
        return json.dumps(schema)  # key order kept: properties come in the order given
    raise ValueError(f"'response_format' type {kind!r} is not supported: text, json_object or "
                     "json_schema")


class Grammars:
    """Compiled grammars for one tokenizer (tokenizers.Tokenizer) and model vocabulary."""

    def __init__(self, tok, vocab_size: int, stop_ids, cache: int = 64):
        self._tok, self.vocab_size, self._stop = tok, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._size = cache

    def compiler(self):
        if self._compiler is None:
            xgr = _xgrammar()
            from transformers import PreTrainedTokenizerFast

            info = xgr.TokenizerInfo.from_huggingface(
                PreTrainedTokenizerFast(tokenizer_object=self._tok), vocab_size=self.vocab_size,
                stop_token_ids=self._stop)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def compile(self, fmt: dict):
        """OpenAI's response_format -> a compiled grammar (None for plain text)."""
        key = format_key(fmt)
        if key is None:
            return None
        if key not in self._cache:
            comp = self.compiler()
            try:  # compact JSON: a model cannot pad it with whitespace without end
                grammar = comp.compile_json_schema('{"type": "object"}' if key == "json"
                                                   else key, any_whitespace=False)
            except Exception as e:  # noqa: BLE001 - xgrammar's errors for a bad schema
                raise ValueError(f"'response_format' schema cannot be compiled: {e}") from e
            self._cache[key] = grammar
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]


@dataclass(frozen=True)
class AnswerGrammar:
    """A compiled grammar (Grammars.compile) and, for a reasoning model (harmony or <think>
    tags), its codec: the grammar then holds the answer only (see the module)."""

    compiled: object
    codec: object | None = None  # serve.text.TextCodec

    def constraint(self, prompt: Sequence[int], vocab_size: int) -> Constraint:
        """A new row's place in the grammar, after `prompt` (where a template may have
        opened a thought or a message already)."""
        parts, opener = None, None
        if self.codec is not None:
            from serve.answer import AnswerParts

            parts = AnswerParts(self.codec)
            for t in prompt:
                parts.route(t)
            if self.codec.think is not None and parts.in_answer:  # no thought opened yet
                opener = self.codec.think[0]
        return Constraint(self.compiled, vocab_size, parts, opener)


class Constraint:
    """One row's place in a compiled grammar: `mask` the logits of its next token, `accept`
    the token drawn; `done` once the grammar has ended (its stop token taken).

    parts (serve.answer.AnswerParts, fed the prompt): the grammar holds only the tokens that
    are the answer's text (a reasoning model's; see the module); opener (<think>): a token
    also allowed before the answer's first token, which opens a thought the grammar lets be
    (once)."""

    def __init__(self, grammar, vocab_size: int, parts=None, opener: int | None = None):
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.parts, self.opener = parts, opener
        self._begun = False  # the grammar has taken a token

    @property
    def holding(self) -> bool:
        """Whether the grammar holds the next token."""
        return self.parts is None or self.parts.in_answer

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> a copy with the tokens the grammar cannot take next at -inf (the
        logits as they are where it does not hold)."""
        if not self.holding:
            return logits
        out = logits.float().clone().unsqueeze(0)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(out, self.bitmask.to(out.device))
        if self.opener is not None and not self._begun:
            out[0, self.opener] = logits[self.opener]
        return out[0]

    def accept(self, tok: int) -> None:
        held = self.holding
        if self.parts is not None:
            self.parts.route(tok)
        if held and tok == self.opener and not self._begun:  # a thought opens, once
            self.opener = None
            return
        if not held:
            return
        if not self.matcher.accept_token(tok):
            raise RuntimeError(f"token {tok} was drawn against the grammar")
        self._begun = True

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()
